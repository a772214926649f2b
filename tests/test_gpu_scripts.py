"""The scripts that only run on the lent GPU machine at least parse, so a slip in one fails here, on CPU,
instead of costing a device call."""

import json
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


def test_summarize_builds_means_each_builds_rounds_against_the_first(tmp_path):
    """scripts/summarize_builds.py, which compare_builds.sh ends with: kernel_ms (not loop_ms) averaged over a
    build's rounds, the change against the first build named, the spread, and a dash for a row a build lacks."""

    def bench(folder, rows):
        (tmp_path / folder).mkdir()
        records = [{"batch": 128, "s_k": s_k, "s_q": s_q, "h_q": h_q, "causal": causal, "kernel_ms": ms,
                    "loop_ms": 10 * ms} for s_k, s_q, h_q, causal, ms in rows]
        (tmp_path / folder / "results.json").write_text(json.dumps(records))

    bench("bench_head", [(4096, 1, 16, False, 0.20), (4096, 2, 128, True, 0.50)])
    bench("bench2_head", [(4096, 1, 16, False, 0.22), (4096, 2, 128, True, 0.50)])
    bench("bench_new", [(4096, 1, 16, False, 0.19)])
    bench("bench3_new", [(4096, 1, 16, False, 0.19)])
    bench("bench2_other_new", [(4096, 1, 16, False, 9.0)])  # another build's folder, whose name ends like this one's
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "scripts" / "summarize_builds.py"), str(tmp_path), "head",
                             "new"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    memory = next(line for line in lines if line.startswith("b 128 s_k 4096 s_q 1 h_q 16 "))
    assert memory.split()[-5:] == ["0.2100", "(2)", "0.1900", "-9.5%", "(2)"]
    compute = next(line for line in lines if line.startswith("b 128 s_k 4096 s_q 2 h_q 128 causal"))
    assert compute.split()[-3:] == ["0.5000", "(2)", "-"]
    spread = [line for line in lines if line.startswith("b 128 s_k 4096 s_q 1 h_q 16 ")][1]
    assert spread.split()[-2:] == ["9.5%", "0.0%"]
    empty = subprocess.run([sys.executable, str(root / "scripts" / "summarize_builds.py"), str(tmp_path), "other"],
                           capture_output=True, text=True)
    assert empty.stdout.startswith("no bench results")
