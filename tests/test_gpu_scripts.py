"""The scripts that only run on the lent GPU machine at least parse, so a slip in one fails here, on CPU,
instead of costing a device call."""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "scripts").glob("*.sh"))


def test_there_are_scripts():
    assert any(script.name == "gpu_check.sh" for script in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def run_flashmla_ab(*args):
    """scripts/flashmla_ab.py in a subprocess, with the repository importable."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, str(root / "scripts" / "flashmla_ab.py"), *args], capture_output=True,
                          text=True, env=env)


def test_flashmla_ab_script_starts():
    """scripts/flashmla_ab.py imports torch and FlashMLA only once it runs: its --help works anywhere."""
    result = run_flashmla_ab("--help")
    assert result.returncode == 0, result.stderr
    assert "FLASHMLA_DIR" in result.stdout or "flashmla_dir" in result.stdout


def test_flashmla_ab_rejects_bad_pairs():
    """A malformed --pairs stops the script before it builds FlashMLA or touches a GPU."""
    result = run_flashmla_ab(str(pathlib.Path(__file__).resolve().parents[1]), "--pairs", "2x")
    assert result.returncode == 2
    assert "--pairs takes S_QxH_Q" in result.stderr
