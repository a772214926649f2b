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


def test_flashmla_ab_script_starts():
    """scripts/flashmla_ab.py imports torch and FlashMLA only once it runs: its --help works anywhere."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, str(root / "scripts" / "flashmla_ab.py"), "--help"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "FLASHMLA_DIR" in result.stdout or "flashmla_dir" in result.stdout


def test_flashmla_ab_rejects_bad_pairs():
    """A malformed --pairs stops the script before it builds FlashMLA or touches a GPU."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, str(root / "scripts" / "flashmla_ab.py"), str(root), "--pairs", "2x"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "--pairs takes S_QxH_Q" in result.stderr
