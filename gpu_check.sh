#!/usr/bin/env bash
# gpu_check.sh - everything in beneficial-rl that needs CUDA, checked in one go on one NVIDIA GPU.
#
#   bash gpu_check.sh          # ~5 minutes on an H100; full logs in $GPU_CHECK_DIR (default /tmp/gpu_check)
#   PYTHON=python3 STEP_TIMEOUT=300 bash gpu_check.sh    # another interpreter; each step's time limit (s)
#
# What it runs, in order:
#   1. torch sees a CUDA device (a CPU-only torch wheel or a missing driver fails here), and whether
#      the GPU has bf16 (grpo.autocast uses bf16 where it exists and fp32 elsewhere, so "no" is
#      reported, not a failure)
#   2. python bench.py --device cuda             our sampler vs model.generate, GRPO step time (eager)
#   3. python bench.py --device cuda --compile   the same with a static KV cache + compiled decode step
#                                                (TORCH_LOGS=recompiles,perf_hints: recompiles and
#                                                skipped CUDA graphs are counted in the table)
#   4. steps 2 and 3 at a 0.2B shape (hidden 1024, 16 layers, GQA 16/4, 256 new tokens), where a
#      decode step is bound by memory bandwidth rather than by kernel launches
#   5. python run.py --preset smoke              every stage of the experiment on the GPU, from scratch
# and last a table: device, sampler vs generate tokens/s, GRPO step time, the decode's memory
# bandwidth against a measured copy and the datasheet, recompiles, smoke wall time, read from
# bench.py's final JSON line. A failed step shows the end of its log and the others still run; the
# script then exits 1.
set -uo pipefail
cd "$(dirname "$0")"
LOG_DIR="${GPU_CHECK_DIR:-/tmp/gpu_check}"
PY="${PYTHON:-python}"
STEP_TIMEOUT="${STEP_TIMEOUT:-600}"  # a hung step (a driver, a compile) is killed and reported
SMOKE_DIR=/tmp/gpu_smoke
mkdir -p "$LOG_DIR"

failed=()
step() {  # step NAME COMMAND...: run COMMAND (at most STEP_TIMEOUT s), its output in $LOG_DIR/NAME.log
    local name=$1 start=$SECONDS
    shift
    echo "== $name (log: $LOG_DIR/$name.log)"
    timeout "$STEP_TIMEOUT" "$@" >"$LOG_DIR/$name.log" 2>&1 || {
        echo "FAILED: $name (exit code $?). Last lines of $LOG_DIR/$name.log:" >&2
        tail -n 25 "$LOG_DIR/$name.log" >&2
        failed+=("$name")
    }
    echo "   $((SECONDS - start)) s"
}

step cuda "$PY" -c "
import torch
assert torch.cuda.is_available(), f'torch {torch.__version__} sees no CUDA device (CPU-only wheel, or no driver?)'
print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| bf16', 'yes' if torch.cuda.is_bf16_supported() else 'no (fp32, no autocast)')"
((${#failed[@]})) && exit 1
BIG="--hidden 1024 --layers 16 --heads 16 --kv-heads 4 --intermediate 4096 --new-tokens 256 --prompt-tokens 64"
LOGS=recompiles,perf_hints
step bench_eager "$PY" bench.py --device cuda
step bench_compile env TORCH_LOGS=$LOGS "$PY" bench.py --device cuda --compile
step bench_big_eager "$PY" bench.py --device cuda $BIG
step bench_big_compile env TORCH_LOGS=$LOGS "$PY" bench.py --device cuda --compile $BIG
rm -rf "$SMOKE_DIR"  # a cached run would time nothing
start=$SECONDS
step smoke "$PY" run.py --preset smoke --out-dir "$SMOKE_DIR"
smoke_s=$((SECONDS - start))
test -s "$SMOKE_DIR/smoke/report.json" || { echo "FAILED: smoke wrote no $SMOKE_DIR/smoke/report.json" >&2; failed+=(smoke_report); }

"$PY" - "$LOG_DIR" "$smoke_s" <<'EOF'
import json, sys

log_dir, smoke_s = sys.argv[1], sys.argv[2]
print()
print("device:", open(f"{log_dir}/cuda.log").read().strip().splitlines()[-1])
print("| bench.py | params | sampler tok/s | model.generate tok/s | speedup | GRPO step_s"
      " | decode GB/s | copy GB/s | decode / copy | datasheet GB/s | recompiles | cudagraph skips |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in ("eager", "compile", "big_eager", "big_compile"):
    text = open(f"{log_dir}/bench_{name}.log").read()
    try:
        r = json.loads(text.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"| {name} | (no JSON line: see {log_dir}/bench_{name}.log) |")
        continue
    print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['sample_tokens_per_s']:.0f} | {r['generate_tokens_per_s']:.0f}"
          f" | {r['speedup']:.1f}x | {r['step_s']:.3f} | {r['decode_bw_gbs']:.0f} | {r['peak_bw_gbs']:.0f}"
          f" | {r['bw_frac']:.0%} | {r.get('spec_bw_gbs') or 'unknown'} | {text.count('Recompiling')}"
          f" | {text.lower().count('skipping cudagraphs')} |")
print(f"smoke preset (run.py --preset smoke, every stage): {smoke_s} s wall")
EOF
if ((${#failed[@]})); then
    echo "FAILED steps: ${failed[*]}" >&2
    exit 1
fi
