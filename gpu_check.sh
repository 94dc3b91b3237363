#!/usr/bin/env bash
# gpu_check.sh - everything in beneficial-rl that needs CUDA, checked in one go on one NVIDIA GPU.
#
#   bash gpu_check.sh          # a few minutes; full logs in $GPU_CHECK_DIR (default /tmp/gpu_check)
#
# What it runs, in order (any failure stops it, naming the step and showing the end of its log):
#   1. torch sees a CUDA device (a CPU-only torch wheel or a missing driver fails here), and whether
#      the GPU has bf16 (grpo.autocast uses bf16 where it exists and fp32 elsewhere, so "no" is
#      reported, not a failure)
#   2. python bench.py --device cuda             our sampler vs model.generate, GRPO step time (eager)
#   3. python bench.py --device cuda --compile   the same with a static KV cache + compiled decode step
#   4. python run.py --preset smoke              every stage of the experiment on the GPU, from scratch
# and last a table: device, sampler vs generate tokens/s, GRPO step time, the decode's memory
# bandwidth against a measured copy and the datasheet, smoke wall time, read from bench.py's final
# JSON line.
set -euo pipefail
cd "$(dirname "$0")"
LOG_DIR="${GPU_CHECK_DIR:-/tmp/gpu_check}"
SMOKE_DIR=/tmp/gpu_smoke
mkdir -p "$LOG_DIR"

step() {  # step NAME COMMAND...: run COMMAND, its output in $LOG_DIR/NAME.log
    local name=$1
    shift
    echo "== $name (log: $LOG_DIR/$name.log)"
    "$@" >"$LOG_DIR/$name.log" 2>&1 || {
        local rc=$?
        echo "FAILED: $name (exit code $rc). Last lines of $LOG_DIR/$name.log:" >&2
        tail -n 25 "$LOG_DIR/$name.log" >&2
        exit 1
    }
}

step cuda python -c "
import torch
assert torch.cuda.is_available(), f'torch {torch.__version__} sees no CUDA device (CPU-only wheel, or no driver?)'
print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| bf16', 'yes' if torch.cuda.is_bf16_supported() else 'no (fp32, no autocast)')"
step bench_eager python bench.py --device cuda
step bench_compile python bench.py --device cuda --compile
rm -rf "$SMOKE_DIR"  # a cached run would time nothing
start=$SECONDS
step smoke python run.py --preset smoke --out-dir "$SMOKE_DIR"
smoke_s=$((SECONDS - start))
test -s "$SMOKE_DIR/smoke/report.json" || { echo "FAILED: smoke wrote no $SMOKE_DIR/smoke/report.json" >&2; exit 1; }

python - "$LOG_DIR" "$smoke_s" <<'EOF'
import json, sys

log_dir, smoke_s = sys.argv[1], sys.argv[2]
print()
print("device:", open(f"{log_dir}/cuda.log").read().strip().splitlines()[-1])
print("| bench.py (default shape) | sampler tok/s | model.generate tok/s | speedup | GRPO step_s"
      " | decode GB/s | copy GB/s | decode / copy | datasheet GB/s |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("eager", "compile"):
    lines = open(f"{log_dir}/bench_{name}.log").read().strip().splitlines()
    try:
        r = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"FAILED: the last line of {log_dir}/bench_{name}.log is not bench.py's JSON line")
    print(f"| {name} | {r['sample_tokens_per_s']:.0f} | {r['generate_tokens_per_s']:.0f} | {r['speedup']:.1f}x | {r['step_s']:.3f}"
          f" | {r['decode_bw_gbs']:.0f} | {r['peak_bw_gbs']:.0f} | {r['bw_frac']:.0%} | {r.get('spec_bw_gbs') or 'unknown'} |")
print(f"smoke preset (run.py --preset smoke, every stage): {smoke_s} s wall")
EOF
