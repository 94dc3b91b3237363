"""gpu_check.sh without a GPU: the dry run's plan (order, caps within the 300 s budget), the one-line
refusal on a machine without CUDA, and the results file written step by step (a stand-in python
that answers as a CUDA machine would, so the parsing that only runs on a GPU is exercised here)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["cuda", "smoke", "bench_eager", "bench_compile", "bench_big"]  # by value: a cut-off run loses the least
BUDGET_S = 300  # a 15-minute device window, machine start and transfers included


def gpu_check(*args, env=None, timeout=60):
    return subprocess.run(["bash", "gpu_check.sh", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def plan_of(stdout):
    return [(m[1], int(m[2])) for m in re.finditer(r"^step \d+ (\S+)\s+cap\s+(\d+) s", stdout, re.M)]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_prints_the_plan_in_order_within_the_budget(how):
    proc = gpu_check("--dry-run") if how == "flag" else gpu_check(env={"DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    plan = plan_of(proc.stdout)
    assert [name for name, _ in plan] == ORDER
    total = sum(cap for _, cap in plan)
    assert total <= BUDGET_S and all(cap > 0 for _, cap in plan)
    assert f"total cap {total} s" in proc.stdout
    assert "bench.py --device cuda" in proc.stdout and "--tis token" in proc.stdout  # the mismatch correction is measured


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_nonzero(tmp_path):
    proc = gpu_check(str(tmp_path), env={"PYTHON": sys.executable})
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA" in lines[0], lines
    assert (tmp_path / "results.txt").read_text().startswith("cuda FAIL")


FAKE_BENCH = {"params": 2.0e8, "sample_tokens_per_s": 5000.0, "step_s": 1.5, "rollout_s": 1.0, "train_s": 0.5,
              "decode_bw_gbs": 2400.0, "peak_bw_gbs": 4000.0, "bw_frac": 0.6, "spec_bw_gbs": 4800,
              "mismatch_kl": 2.5e-4, "mismatch_trunc_frac": 0.001}


def test_results_are_written_step_by_step(tmp_path):
    """A stand-in python: CUDA 'present', run.py writes a report, bench.py prints a JSON line (and two
    recompile messages); the results file gets one parsed line per step, in the plan's order."""
    fake = tmp_path / "python"
    bench_json = json.dumps(FAKE_BENCH)
    fake.write_text(f"""#!/bin/bash
case "$1" in
  -c) echo 'device="FAKE GPU" torch=x cuda=y bf16=yes' ;;
  run.py) mkdir -p "$SMOKE_DIR/smoke" && echo '{{}}' > "$SMOKE_DIR/smoke/report.json" ;;
  bench.py) printf 'Recompiling function x\\nRecompiling function y\\n'
            if [[ " $* " == *" --tis token "* ]]; then
              echo '{bench_json[:-1]}, "tis_mismatch_kl": 2.4e-4, "tis_trunc_frac": 0.002, "tis_step_s": 1.6}}'
            else echo '{bench_json}'; fi ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = gpu_check(env={"PYTHON": str(fake), "GPU_CHECK_DIR": str(out), "SMOKE_DIR": str(tmp_path / "smoke")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (out / "results.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ORDER + ["all"]
    assert all(line.split()[1] == "ok" for line in lines[:-1]) and lines[-1] == "all steps ok"
    for line in lines[2:5]:  # the three bench.py steps
        fields = dict(kv.split("=", 1) for kv in line.split()[2:])
        assert float(fields["hbm_frac"]) == pytest.approx(0.5)  # 2400 / 4800 GB/s
        assert float(fields["mismatch_kl"]) == pytest.approx(2.5e-4) and fields["recompiles"] == "2"
        assert ("tis_mismatch_kl" in fields) == line.startswith("bench_compile")
    assert "tis_trunc_frac=0.002" in lines[3]
    assert all(line in proc.stdout for line in lines)  # printed too
    assert (out / "bench_big.log").exists()
