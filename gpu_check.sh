#!/usr/bin/env bash
# gpu_check.sh - what in beneficial-rl needs CUDA, checked on one NVIDIA GPU inside a 15-minute
# window (machine start included): five steps, most valuable first, each with its own time cap,
# the caps adding up to 300 s. docs/GPU.md explains the plan and every metric.
#
#   PYTHON=/opt/torch/.venv/bin/python3 GPU_CHECK_DIR=$OUT bash gpu_check.sh
#   bash gpu_check.sh OUT_DIR             # the folder as the first argument (default /tmp/gpu_check)
#   bash gpu_check.sh --dry-run           # (or DRY_RUN=1) print the plan and its caps; needs no CUDA
#
# Every result is printed AND appended, one line each, to OUT_DIR/results.txt the moment it exists,
# so a run cut off by its window still leaves what it measured; each step's full output is in
# OUT_DIR/<step>.log. A result line is `<step> ok key=value ...` or `<step> FAIL ...`.
#   1. cuda           torch sees a CUDA device; its name, torch/CUDA versions, bf16 or not
#   2. smoke          python run.py --preset smoke: every stage of the experiment, from scratch (wall s)
#   3. bench_eager    bench.py on the GPU, eager: sampler tokens/s, GRPO step time, decode bandwidth
#                     (GB/s, fraction of a measured copy and of the datasheet HBM figure), the
#                     sampler/trainer mismatch KL of bf16 sampling
#   4. bench_compile  the same with the compiled decode step (CUDA graphs), TORCH_LOGS=recompiles
#                     counted, and the GRPO steps run again with the mismatch correction on (--tis token)
#   5. bench_big      compiled, a 0.2B shape (hidden 1024, 16 layers, GQA 16/4, 256 new tokens), where
#                     a decode step is bound by memory bandwidth rather than by kernel launches
# Without CUDA (and not a dry run) it says so in one line and exits 2; a failed or timed-out step is
# reported and the next one still runs; the exit code is then 1.
# Needs torch, transformers, numpy, tqdm (no datasets, accelerate, gguf or model hub).
set -uo pipefail
cd "$(dirname "$0")"

DRY_RUN="${DRY_RUN:-0}"
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) OUT_ARG="$arg" ;;
    esac
done
DIR="${OUT_ARG:-${GPU_CHECK_DIR:-/tmp/gpu_check}}"
PY="${PYTHON:-python}"
SMOKE_DIR="${SMOKE_DIR:-/tmp/gpu_check_smoke}"
RESULTS="$DIR/results.txt"

# The plan: name|cap (s)|command (cuda's is the inline check below). Ordered by value: a window cut
# short loses the least. The caps add up to 300 s (tests/test_gpu_check.py holds them to it).
BENCH="$PY bench.py --device cuda --skip-generate --judge-responses 0 --repeats 3 --steps 2"
BIG="--hidden 1024 --layers 16 --heads 16 --kv-heads 4 --intermediate 4096 --new-tokens 256 --prompt-tokens 64"
LOGS="env TORCH_LOGS=recompiles,perf_hints"
PLAN=(
    "cuda|20|torch sees a CUDA device (name, versions, bf16)"
    "smoke|90|$PY run.py --preset smoke --out-dir $SMOKE_DIR"
    "bench_eager|50|$BENCH"
    "bench_compile|80|$LOGS $BENCH --compile --tis token"
    "bench_big|60|$LOGS $BENCH --compile $BIG"
)

cap_of() {  # cap_of NAME
    local row
    for row in "${PLAN[@]}"; do
        IFS='|' read -r n c _ <<<"$row"
        [[ $n == "$1" ]] && { echo "$c"; return; }
    done
}

cmd_of() {  # cmd_of NAME
    local row
    for row in "${PLAN[@]}"; do
        IFS='|' read -r n _ cmd <<<"$row"
        [[ $n == "$1" ]] && { echo "$cmd"; return; }
    done
}

if [[ $DRY_RUN == 1 ]]; then
    total=0
    echo "gpu_check plan (dry run: nothing is run; results would go to $RESULTS)"
    i=1
    for row in "${PLAN[@]}"; do
        IFS='|' read -r n c what <<<"$row"
        printf 'step %d %-13s cap %3d s  %s\n' "$i" "$n" "$c" "$what"
        total=$((total + c))
        i=$((i + 1))
    done
    echo "total cap $total s"
    exit 0
fi

mkdir -p "$DIR"
: >"$RESULTS"
result() {  # result LINE: print it and append it to the results file at once
    echo "$*"
    echo "$*" >>"$RESULTS"
}

# 1. CUDA: without it, one line and exit 2 (nothing else here can run)
CAP=$(cap_of cuda)
cuda_line=$(timeout -k 5 "$CAP" "$PY" -c "
import torch
if not torch.cuda.is_available():
    raise SystemExit(f'torch {torch.__version__} sees no CUDA device (CPU-only wheel, or no driver?)')
print(f'device=\"{torch.cuda.get_device_name(0)}\" torch={torch.__version__} cuda={torch.version.cuda}',
      'bf16=' + ('yes' if torch.cuda.is_bf16_supported() else 'no'))" 2>"$DIR/cuda.log")
rc=$?
if ((rc != 0)); then
    why=$(grep -v '^\s*$' "$DIR/cuda.log" | tail -n 1)
    echo "cuda FAIL rc=$rc $why" >>"$RESULTS"
    echo "gpu_check: no CUDA, nothing checked (${why:-rc $rc}; see $DIR/cuda.log)" >&2
    exit 2
fi
result "cuda ok $cuda_line"

failed=()
run_step() {  # run_step NAME COMMAND...: at most the step's cap; output in $DIR/NAME.log; returns its rc
    local name=$1 cap start rc
    shift
    cap=$(cap_of "$name")
    start=$SECONDS
    echo "== $name (cap $cap s, log $DIR/$name.log)"
    timeout -k 5 "$cap" "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    STEP_S=$((SECONDS - start))
    if ((rc != 0)); then
        local why="rc=$rc"
        ((rc == 124 || rc == 137)) && why="timeout (cap $cap s)"
        result "$name FAIL $why wall_s=$STEP_S log=$DIR/$name.log"
        tail -n 15 "$DIR/$name.log" >&2
        failed+=("$name")
    fi
    return $rc
}

bench_result() {  # bench_result NAME: the result line of a bench.py log (its last line is JSON)
    "$PY" - "$DIR/$1.log" "$1" "$STEP_S" <<'EOF'
import json, sys

path, name, wall = sys.argv[1:]
text = open(path).read()
lines = text.strip().splitlines()
try:
    r = json.loads(lines[-1])
except (IndexError, json.JSONDecodeError):
    print(f"{name} FAIL no JSON line (see {path})")
    raise SystemExit
spec = r.get("spec_bw_gbs")
out = {"params_M": r["params"] / 1e6, "sample_tok_s": r["sample_tokens_per_s"], "step_s": r["step_s"],
       "rollout_s": r["rollout_s"], "train_s": r["train_s"], "decode_bw_gbs": r["decode_bw_gbs"],
       "copy_bw_gbs": r["peak_bw_gbs"], "bw_frac_of_copy": r["bw_frac"], "spec_bw_gbs": spec,
       "hbm_frac": r["decode_bw_gbs"] / spec if spec else None,
       "mismatch_kl": r.get("mismatch_kl"), "trunc_frac": r.get("mismatch_trunc_frac"),
       "tis_mismatch_kl": r.get("tis_mismatch_kl"), "tis_trunc_frac": r.get("tis_trunc_frac"),
       "tis_step_s": r.get("tis_step_s"),
       "recompiles": text.count("Recompiling"), "cudagraph_skips": text.lower().count("skipping cudagraphs"),
       "wall_s": int(wall)}
fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
print(f"{name} ok " + " ".join(f"{k}={fmt(v)}" for k, v in out.items() if v is not None))
EOF
}

# 2. the smoke preset, every stage from scratch (a cached run would time nothing)
rm -rf "$SMOKE_DIR"
read -ra cmd <<<"$(cmd_of smoke)"
if run_step smoke "${cmd[@]}"; then
    if test -s "$SMOKE_DIR/smoke/report.json"; then
        result "smoke ok wall_s=$STEP_S report=$SMOKE_DIR/smoke/report.json"
    else
        result "smoke FAIL no $SMOKE_DIR/smoke/report.json wall_s=$STEP_S"
        failed+=(smoke_report)
    fi
fi

# 3-5. bench.py: eager, compiled (+ the GRPO steps again with the mismatch correction), the larger shape
for name in bench_eager bench_compile bench_big; do
    read -ra cmd <<<"$(cmd_of "$name")"
    if run_step "$name" "${cmd[@]}"; then
        line=$(bench_result "$name")
        result "$line"
        [[ $line == *" FAIL "* ]] && failed+=("$name")
    fi
done

if ((${#failed[@]})); then
    result "FAILED steps: ${failed[*]}"
    exit 1
fi
result "all steps ok"
