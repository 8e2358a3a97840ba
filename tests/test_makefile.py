"""`make install`: torch comes from pip's configured index unless TORCH_INDEX names another.
Checked with `make -n -B` (print the commands, run nothing)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _torch_lines(*args: str) -> list[str]:
    r = subprocess.run(["make", "-n", "-B", "install", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if "pip install" in ln and "torch==" in ln]


def test_default_install_uses_pips_own_index():
    (line,) = _torch_lines()
    assert line.endswith("-m pip install -q torch==2.13.0")
    assert "--index-url" not in line


def test_torch_index_is_passed_to_pip():
    (line,) = _torch_lines("TORCH_INDEX=https://download.example/whl/cpu")
    assert line.endswith("-m pip install -q --index-url https://download.example/whl/cpu torch==2.13.0")
