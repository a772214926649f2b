"""`python -m jax_flashmla.demo` end to end at its smallest setting (also on 4-CPU-device meshes), its failure
exit code and its flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jax_flashmla import demo

SMALLEST = [
    "--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "32", "--vocab", "64",
    "--q-lora-rank", "0", "--batch", "2", "--min-prompt-len", "3", "--max-prompt-len", "66", "--steps", "4",
]  # fmt: skip


def run_demo(flags, cpu_devices=None):
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if cpu_devices:  # XLA_FLAGS only takes effect before JAX starts: hence a fresh process
        flag = f"--xla_force_host_platform_device_count={cpu_devices}"
        env.update(XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {flag}".strip(), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jax_flashmla.demo", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parents[1],  # `-m` finds the package from the repository root
    )


def test_demo_runs_end_to_end_as_a_module():
    proc = run_demo([*SMALLEST, "--no-progress"])
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "prompt lengths [3, 66]" in out
    assert "mesh" not in out  # without --mesh: no mesh, output as before
    throughput = float(re.search(r"decode throughput: ([0-9.]+) tokens/s", out).group(1))
    assert throughput > 0
    latency = re.search(r"latency over (\d+) steps: mean ([0-9.]+) ms", out)
    assert int(latency.group(1)) == 2 and float(latency.group(2)) > 0  # 4 tokens: prefill + 3 steps, 1st compiles
    diff = float(re.search(r"max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert 0 <= diff < 1e-3
    assert out.rstrip().endswith("OK")


def test_demo_runs_sparse_attention_through_an_indexer():
    flags = [*SMALLEST, "--q-lora-rank", "16", "--index-topk", "8", "--no-progress"]  # prompts of 3 to 66 tokens
    proc = run_demo(flags)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "a lightning indexer (64 heads of 128) picks 8 tokens per query" in out, out
    diff = float(re.search(r"max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert 0 <= diff < 1e-3
    assert out.rstrip().endswith("OK")


@pytest.mark.parametrize("mesh, devices, heads", [("data=2,model=1", 2, 1), ("data=2,model=2", 4, 2)])
def test_demo_runs_on_a_mesh_of_cpu_devices(mesh, devices, heads):
    proc = run_demo([*SMALLEST, "--no-progress", "--mesh", mesh], cpu_devices=4)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    shown = mesh.replace(",", ", ")
    assert f"mesh: {shown} over {devices} of 4 cpu devices; batch split 2 ways, heads {heads} ways" in out, out
    diff = float(re.search(r"max \|diff\| = ([0-9.e+-]+)", out).group(1))
    assert 0 <= diff < 1e-3
    assert out.rstrip().endswith("OK")


def test_demo_pages_on_demand_on_a_mesh():
    """Prompts of 3 and 66 tokens and 3 tokens fed back take 1 and 2 pages, one stack per batch shard of 2."""
    proc = run_demo([*SMALLEST, "--no-progress", "--mesh", "data=2,model=1", "--num-pages", "4"], cpu_devices=4)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "cache: pages on demand, 3 of a pool of 4 in use; a static reservation would hold 4" in out, out
    assert out.rstrip().endswith("OK")


def test_demo_too_few_pages_exits_2():
    proc = run_demo([*SMALLEST, "--no-progress", "--num-pages", "2"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--num-pages: num_pages=2 is too few: the prompts and new tokens need 3 pages" in proc.stderr


def test_demo_mesh_the_batch_does_not_divide_exits_2():
    proc = run_demo([*SMALLEST, "--batch", "3", "--mesh", "data=2,model=1"], cpu_devices=4)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--mesh: the batch (3) must divide evenly over data=2" in proc.stderr
    assert proc.stdout == ""  # refused before building anything


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
     ["--temperature", "0"], ["--q-lora-rank", "-1"], ["--index-topk", "-1"],
     ["--index-topk", "8", "--q-lora-rank", "0"], ["--num-pages", "-1"]],
)  # fmt: skip
def test_bad_flags_exit_with_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(flags)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, words",
    [("data", "name=size pairs"), ("data=two", "name=size pairs"), ("data=0,model=1", "positive sizes"),
     ("data=2,data=1", "distinct names"), ("data=4096,model=1", "needs 4096 devices")],
)  # fmt: skip
def test_bad_mesh_flag_exits_with_usage_error(flag, words, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--mesh", flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mesh" in err and words in err, err


@pytest.mark.parametrize(
    "flags, words",
    [(["--batch", "3"], "the batch (3) must divide evenly over data=2"),
     (["--prompt-lengths", "4,5,6"], "the batch (3) must divide evenly over data=2"),
     (["--heads", "3"], "--heads (3) must divide evenly over model=2")],
)  # fmt: skip
def test_mesh_that_does_not_divide_the_batch_or_heads_exits_2(flags, words, monkeypatch, capsys):
    """The shape checks, without the devices: the flag's mesh is replaced by an abstract one of its shape."""
    monkeypatch.setattr(demo, "mesh_from_flag", lambda flag: AbstractMesh((2, 2), ("data", "model")))
    with pytest.raises(SystemExit) as exc:
        demo.parse_args([*flags, "--mesh", "data=2,model=2"])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err
    assert demo.parse_args(["--batch", "4", "--heads", "4", "--mesh", "data=2,model=2"]).device_mesh.shape == {
        "data": 2, "model": 2}  # fmt: skip


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
