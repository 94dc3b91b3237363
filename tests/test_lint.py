"""The linter is part of the suite: `ruff check` (settings in pyproject.toml) must pass on the whole
tree, so a CI run that forgets it cannot go green."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_passes_on_the_tree():
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    assert os.path.exists(ruff), "ruff is not installed: pip install -r requirements.txt"
    out = subprocess.run([ruff, "check", "--no-cache", ROOT], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
