"""`python -m jax_flashmla.demo` end to end at its smallest setting, its failure exit code and its flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_flashmla import demo

SMALLEST = [
    "--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "32", "--vocab", "64",
    "--q-lora-rank", "0", "--batch", "2", "--min-prompt-len", "3", "--max-prompt-len", "66", "--steps", "4",
]  # fmt: skip


def test_demo_runs_end_to_end_as_a_module():
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(
        [sys.executable, "-m", "jax_flashmla.demo", *SMALLEST, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parents[1],  # `-m` finds the package from the repository root
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "prompt lengths [3, 66]" in out
    throughput = float(re.search(r"decode throughput: ([0-9.]+) tokens/s", out).group(1))
    assert throughput > 0
    latency = re.search(r"latency over (\d+) steps: mean ([0-9.]+) ms", out)
    assert int(latency.group(1)) == 2 and float(latency.group(2)) > 0  # 4 tokens: prefill + 3 steps, 1st compiles
    diff = float(re.search(r"max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert 0 <= diff < 1e-3
    assert out.rstrip().endswith("OK")


def test_demo_exits_nonzero_when_cached_logits_disagree(monkeypatch, capsys):
    real = demo.recompute_logits

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) + 0.05

    monkeypatch.setattr(demo, "recompute_logits", off_by_a_bit)
    assert demo.main(SMALLEST + ["--no-progress", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out
    assert float(re.search(r"max \|diff\| = ([0-9.e+-]+)", out).group(1)) == pytest.approx(0.05, rel=1e-3)


def test_demo_defaults_are_a_ragged_batch_across_pages():
    args = demo.parse_args([])
    assert len(set(args.lengths)) == len(args.lengths) == args.batch  # all lengths differ
    assert max(args.lengths) + args.steps > 64  # decoding crosses a page boundary
    assert args.top_k == 1 and args.dtype in ("float32", "bfloat16")


def test_explicit_prompt_lengths_set_the_batch():
    args = demo.parse_args(["--prompt-lengths", "7,1,130"])
    assert args.lengths == [7, 1, 130]


@pytest.mark.parametrize(
    "flags",
    [["--steps", "0"], ["--prompt-lengths", "3,x"], ["--prompt-lengths", "3,0"], ["--top-k", "0"],
     ["--vocab", "8", "--top-k", "9"], ["--min-prompt-len", "9", "--max-prompt-len", "3"], ["--dtype", "int8"],
     ["--temperature", "0"], ["--q-lora-rank", "-1"]],
)  # fmt: skip
def test_bad_flags_exit_with_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(flags)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_progress_falls_back_to_plain_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `from tqdm import tqdm` raise ImportError
    progress = demo.Progress(20, enabled=True)
    for done in range(1, 21):
        progress(done, 20)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  generated 2/20 tokens per sequence"
    assert lines[-1] == "  generated 20/20 tokens per sequence"
    assert len(lines) == 10
    assert np.all(np.diff([int(re.search(r"(\d+)/", x).group(1)) for x in lines]) > 0)
