"""`python -m jax_flashmla.bench` at its smallest: the files it writes, its formulas, its grid, its flags."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla import bench
from jax_flashmla.reference import mla_decode_reference

TINY = ["--batch", "2", "--seqlen", "512", "--iters", "5", "--warmup", "1", "--repeats", "3"]
FIELDS = {"device_kind", "platform", "kernels_available", "kernels_used", "jax_version", "jaxlib_version",
          "jax_flashmla_version", "decode_kernel_env", "combine_env", "combine_slices_env", "date_utc", "method",
          "batch", "s_k", "s_q", "h_q", "h_kv", "causal", "dtype", "mean_len", "kernel_ms", "e2e_ms", "flops", "bytes",
          "tflops", "gbps", "roofline_pct", "baseline_ms", "speedup", "reportable", "baseline_iters", "kernel_timing",
          "loop_ms", "baseline_timing", "baseline_loop_ms", "kernel_tail_ms"}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run with the baseline: s_q 2, causal off and on (two rows); a decode takes a few ms on a CPU."""
    out = tmp_path_factory.mktemp("bench")
    assert bench.main([*TINY, "--s-q", "2", "--h-q", "16", "--causal", "both", "--out", str(out)]) == 0
    return out


def test_writes_json_and_csv_with_every_field(run):
    records = json.loads((run / "results.json").read_text())
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["causal"] for r in records] == [False, True]
    assert len(rows) == 2 and FIELDS <= set(rows[0]) and FIELDS <= set(records[0])
    for r in records:
        assert r["device_kind"] == jax.devices()[0].device_kind
        assert r["kernels_used"] is (r["platform"] == "gpu" and r["kernels_available"])
        assert r["reportable"] is False  # --iters 3
        assert 2 <= r["min_len"] <= r["mean_len"] <= r["max_len"] <= 1024  # clipped to [s_q, 2 s_k]
        # A GPU run with kernels reads each call's time off the profiler's device timeline; elsewhere there is
        # none, and the time is the wall-clock loop's.
        assert r["kernel_timing"] == ("profiler" if r["kernels_used"] else "wall-loop")
        if r["kernel_timing"] == "wall-loop":
            assert r["kernel_ms"] == r["loop_ms"] and r["kernel_tail_ms"] is None
        else:
            assert 0 <= r["kernel_tail_ms"] < r["kernel_ms"]


def test_times_are_positive_and_metrics_follow_the_formulas(run):
    for r in json.loads((run / "results.json").read_text()):
        assert r["e2e_ms"] > 0 and r["baseline_ms"] > 0
        if r["kernel_ms"] <= 0:  # a loop-time difference: CPU noise can swamp a tiny problem
            pytest.skip(f"timing noise made kernel_ms {r['kernel_ms']}")
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["kernel_ms"])
        flops, nbytes = bench.flops_and_bytes(2, 2, 16, 1, r["mean_len"])
        assert r["flops"] == pytest.approx(flops) and r["bytes"] == pytest.approx(nbytes)
        assert r["tflops"] == pytest.approx(flops / (r["kernel_ms"] * 1e-3) / 1e12)
        assert r["gbps"] == pytest.approx(nbytes / (r["kernel_ms"] * 1e-3) / 1e9)
        assert 0 < r["roofline_pct"] < 100  # a CPU is nowhere near an H100's roof
        assert r["baseline_max_abs_diff"] < 0.05  # the two decodes agree, so both timed real work


def test_roofline_png_exactly_when_matplotlib_is_installed(run):
    assert (run / "roofline.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_degrades_without_tqdm_and_matplotlib(run, monkeypatch, capsys):
    records = json.loads((run / "results.json").read_text())
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    progress = bench.Progress(total=2)
    progress.update(records[0])
    progress.close()
    assert "[1/2] b=2 s_k=512 s_q=2 h_q=16 h_kv=1 causal=0: kernel" in capsys.readouterr().out
    assert bench.plot_roofline(records, run / "no.png") is False and not (run / "no.png").exists()


def test_cpu_run_says_it_is_not_kernel_numbers_and_no_baseline_gives_nulls(tmp_path, capsys):
    assert bench.main([*TINY, "--s-q", "1", "--h-q", "16", "--fixed-lengths", "--no-baseline",
                       "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    if jax.devices()[0].platform != "gpu":
        assert "ran the pure-JAX reference on cpu" in printed and "NOT kernel numbers" in printed
    assert "kernel ms" in printed and "speedup" in printed  # the table
    (r,) = json.loads((tmp_path / "results.json").read_text())
    assert r["baseline_ms"] is None and r["speedup"] is None and r["baseline_note"] == "skipped (--no-baseline)"
    assert r["mean_len"] == 512 and r["kernel_ms"] > 0 and r["e2e_ms"] > 0
    assert r["flops"] == 2 * 16 * 1 * (2 * 576 * 512 + 2 * 512 * 512)
    assert r["bytes"] == 2 * (1 * 16 * 576 * 2 + 512 * 1 * 576 * 2 + 1 * 16 * 512 * 2)


def test_stacked_pool_rows_time_the_sliced_call_too(tmp_path, capsys):
    """--layers 3: the decode reads layer 2 of a stacked pool in place; e2e_sliced_ms times pages[2] instead."""
    assert bench.main([*TINY, "--s-q", "1", "--h-q", "16", "--fixed-lengths", "--layers", "3", "--out",
                       str(tmp_path)]) == 0
    assert "sliced e2e ms" in capsys.readouterr().out
    (r,) = json.loads((tmp_path / "results.json").read_text())
    assert r["layers"] == 3 and r["e2e_sliced_ms"] > 0 and r["e2e_ms"] > 0
    assert r["baseline_max_abs_diff"] < 0.05  # the in-place decode and the baseline on pages[2] agree
    assert r["kv_cache_mb"] == pytest.approx(2 * 512 * 576 * 2 / 1e6)  # one layer: what a decode reads


def test_one_layer_rows_have_no_sliced_time(run):
    for r in json.loads((run / "results.json").read_text()):
        assert r["layers"] == 1 and r["e2e_sliced_ms"] is None
    assert "sliced" not in bench.format_table(json.loads((run / "results.json").read_text()))


def test_formulas_on_a_hand_computed_example():
    # b 2, s_q 2, h_q 4, h_kv 1, L 10: FLOPs 2*4*2 * (2*576*10 + 2*512*10) = 16 * 21760;
    # bytes 2 * (2*4*576*2 + 10*576*2 + 2*4*512*2) = 2 * (9216 + 11520 + 8192).
    flops, nbytes = bench.flops_and_bytes(2, 2, 4, 1, 10)
    assert flops == 348160 and nbytes == 57856
    # Memory-bound here: floor = 57856 B / 3.35e12 B/s = 17.27 ns; at 1 us that is 1.727 % of the roof.
    assert bench.roofline_pct(flops, nbytes, 1e-3, 989.0, 3350.0) == pytest.approx(100 * 57856 / 3.35e12 / 1e-6)
    # Compute-bound with a 1 TFLOP/s roof: 348160 FLOP take 348.16 ns, i.e. 34.816 % of 1 us.
    assert bench.roofline_pct(flops, nbytes, 1e-3, 1.0, 3350.0) == pytest.approx(34.816)


def test_default_and_quick_grids():
    full = bench.build_grid(bench.parse_args([]))
    assert len(full) == 4 * (3 + 3 * 2)  # per s_k: s_q 1 non-causal only; s_q 2 both ways, for 3 h_q
    assert {r.s_k for r in full} == {4096, 8192, 16384, 32768} and {r.h_q for r in full} == {16, 64, 128}
    assert not any(r.causal for r in full if r.s_q == 1)
    assert all(r.batch == 128 and r.h_kv == 1 and r.dtype == "bfloat16" for r in full)
    quick = bench.build_grid(bench.parse_args(["--quick"]))
    assert [(r.s_k, r.s_q, r.h_q, r.causal) for r in quick] == [
        (4096, 1, 16, False), (4096, 2, 128, False), (16384, 1, 16, False), (16384, 2, 128, False)]


def test_lengths_are_seeded_and_clipped():
    config = bench.RowConfig(batch=1000, s_k=100, s_q=2, h_q=16, h_kv=1, causal=False, dtype="bfloat16")
    lengths = bench.sample_lengths(config, fixed=False, seed=3)
    assert lengths.dtype == np.int32 and lengths.min() == 2 and lengths.max() == 200  # both clips hit at b 1000
    assert abs(lengths.mean() - 100) < 5
    np.testing.assert_array_equal(lengths, bench.sample_lengths(config, fixed=False, seed=3))


def test_page_orders_own_every_page_once_and_contiguous_is_in_order():
    config = bench.RowConfig(batch=3, s_k=100, s_q=1, h_q=4, h_kv=1, causal=False, dtype="bfloat16")
    lengths = np.array([130, 1, 200], np.int32)
    pages = -(-lengths // 64)
    owned = {}
    for order in bench.PAGE_ORDERS:
        table = np.asarray(bench.make_inputs(jax.random.key(0), lengths, config, page_order=order)[2])
        owned[order] = np.concatenate([table[i, :n] for i, n in enumerate(pages)])
        np.testing.assert_array_equal(np.sort(owned[order]), np.arange(pages.sum()))
    np.testing.assert_array_equal(owned["contiguous"], np.arange(pages.sum()))
    assert not np.array_equal(owned["scattered"], owned["contiguous"])


@pytest.mark.parametrize("causal", [False, True])
def test_baseline_and_inputs_match_the_reference(causal):
    config = bench.RowConfig(batch=3, s_k=100, s_q=2, h_q=4, h_kv=1, causal=causal, dtype="bfloat16")
    lengths = bench.sample_lengths(config, fixed=False, seed=0)
    q, k_cache, table, seqlens = bench.make_inputs(jax.random.key(0), lengths, config)
    pages = -(-lengths // 64)
    assert k_cache.shape[0] == pages.sum() and table.shape == (3, pages.max())
    used = np.concatenate([np.asarray(table)[i, :n] for i, n in enumerate(pages)])
    np.testing.assert_array_equal(np.sort(used), np.arange(pages.sum()))  # every page owned exactly once

    baseline = jax.jit(functools.partial(bench.xla_baseline_decode, head_dim_v=512, causal=causal))
    out, lse = baseline(q, k_cache, table, seqlens)
    reference = jax.jit(functools.partial(mla_decode_reference, head_dim_v=512, softmax_scale=576**-0.5,
                                          causal=causal))
    ref_out, ref_lse = reference(q, k_cache, table, seqlens)
    assert out.dtype == jnp.bfloat16 and lse.shape == ref_lse.shape
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=2e-2)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-2)


def test_sparse_rows_time_the_xla_sparse_decode(tmp_path, capsys):
    assert bench.main([*TINY, "--s-q", "1,2", "--h-q", "16", "--sparse-topk", "64", "--fp8", "--out",
                       str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["s_q"], r["sparse_topk"], r["fp8"], r["causal"]) for r in records] == [(1, 64, True, False),
                                                                                       (2, 64, True, False)]
    for r in records:
        assert FIELDS <= set(r) and r["kernels_used"] is False and r["e2e_ms"] > 0
        assert r["baseline_ms"] is None and r["speedup"] is None and "runs in XLA" in r["baseline_note"]
        flops, nbytes = bench.sparse_flops_and_bytes(2, r["s_q"], 16, 64, 656)
        assert (r["flops"], r["bytes"]) == (flops, nbytes)
        assert r["kv_cache_mb"] * 1e6 == pytest.approx(sum(-(-np.asarray([r["min_len"], r["max_len"]]) // 64)) * 64 * 656)
    out = capsys.readouterr().out
    assert "sparse decode runs in XLA" in out and "NOT kernel numbers" in out and " topk " in out


def test_indexer_rows_time_the_indexer_and_the_sparse_decode(tmp_path, capsys):
    assert bench.main([*TINY, "--s-q", "2", "--h-q", "16", "--sparse-topk", "64", "--indexer", "--out",
                       str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "results.json").read_text())
    assert r["indexer"] is True and r["kernels_used"] is False and r["kernel_ms"] > 0
    flops, nbytes = bench.sparse_flops_and_bytes(2, 2, 16, 64, 576 * 2)
    index_flops, index_bytes = bench.indexer_flops_and_bytes(2, 2, r["mean_len"])
    assert index_flops == 2 * 2 * 64 * r["mean_len"] * 2 * 128
    assert (r["flops"], r["bytes"]) == (flops + index_flops, nbytes + index_bytes)
    assert " indexer " in capsys.readouterr().out


def test_indexer_picking_every_position_is_the_causal_dense_decode():
    """With topk past every length the indexer keeps every key each query may see (the queries are each sequence's
    last s_q tokens), so the indexed sparse decode is the causal dense decode (which ignores tokens on invalid page
    ids); pages are scattered, and row 0's second page id is invalid. With topk 200 the picks are distinct
    positions on valid pages at or before each query's own, as many as it sees up to topk."""
    lengths = np.asarray([300, 65, 2], np.int32)
    config = bench.RowConfig(3, 300, 2, 16, 1, True, "bfloat16", sparse_topk=700, indexer=True)
    q, k_cache, table, seqlens = bench.make_inputs(jax.random.key(3), lengths, config)
    table = table.at[0, 1].set(-1)
    index_inputs = bench._index_inputs(jax.random.key(4), batch=3, s_q=2, num_pages=k_cache.shape[0],
                                       dtype=jnp.bfloat16)
    got, _ = bench._indexed_sparse_decode(q, k_cache, table, seqlens, *index_inputs, topk=700, fp8=False)
    want, _ = mla_decode_reference(q, k_cache, table, seqlens, head_dim_v=512, softmax_scale=576**-0.5, causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=2e-2)

    picks = np.asarray(bench.indexer_picks(table, seqlens, *index_inputs, topk=200))
    valid = np.repeat(np.asarray(table) >= 0, 64, axis=1)
    for i, length in enumerate(lengths):
        for j in range(2):
            allowed = np.flatnonzero(valid[i, : length - 2 + j + 1])
            row = picks[i, j][picks[i, j] >= 0]
            assert set(row.tolist()) <= set(allowed.tolist()) and len(set(row.tolist())) == len(row), (i, j, row)
            assert len(row) == min(200, len(allowed)), (i, j, row)


def test_sparse_indices_are_distinct_positions_of_each_sequence():
    lengths = jnp.asarray([130, 5, 0], jnp.int32)
    table = jnp.asarray([[4, 0, 2], [1, 7, 7], [3, 3, 3]], jnp.int32)
    indices = np.asarray(bench.sparse_indices(jax.random.key(0), table, lengths, s_q=2, topk=8, num_pages=8))
    assert indices.shape == (3, 2, 8) and indices.dtype == np.int32
    positions = {4 * 64 + t: t for t in range(64)} | {t: 64 + t for t in range(64)} | {128 + t: 128 + t for t in range(2)}
    for s in range(2):
        row = indices[0, s]
        assert len(set(row)) == 8 and all(positions.get(int(i), 999) < 130 for i in row)  # page 2 holds 128, 129
        assert sorted(indices[1, s][:5]) == [64, 65, 66, 67, 68] and (indices[1, s][5:] == -1).all()
    assert (indices[2] == -1).all()  # an empty sequence
    wide = np.asarray(bench.sparse_indices(jax.random.key(1), table, lengths, s_q=1, topk=300, num_pages=8))
    assert wide.shape == (3, 1, 300) and (wide[0, 0, 130:] == -1).all() and len(set(wide[0, 0, :130])) == 130


@pytest.mark.parametrize("flags", [
    ["--sparse-topk", "0"], ["--fp8"], ["--indexer"], ["--sparse-topk", "64", "--causal", "on"],
    ["--iters", "1"], ["--baseline-iters", "1"], ["--layers", "0"], ["--causal", "maybe"], ["--dtype", "float32"], ["--batch", "0"], ["--seqlen", "12x"],
    ["--h-q", "16", "--h-kv", "3"], ["--s-q", "9", "--seqlen", "4"], ["--peak-gbps", "0"], ["--bogus"],
])  # fmt: skip
def test_cli_rejects_bad_flags(flags):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(flags)
    assert exc.value.code == 2


@pytest.mark.parametrize("device_kind, name", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H800", "H800 SXM"), ("NVIDIA H800 PCIe", "H800 PCIe"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H20", "H20"), ("NVIDIA A100-SXM4-80GB", None),
])  # fmt: skip
def test_gpu_peaks_by_device_kind(device_kind, name):
    peaks = bench.gpu_peaks(device_kind)
    assert (peaks and peaks.name) == name


def test_roofs_follow_the_gpu_unless_given():
    args = bench.parse_args(["--quick"])
    note = bench.resolve_peaks(args, "NVIDIA H200")
    assert (args.peak_tflops, args.peak_gbps, args.l2_bytes) == (989.0, 4800.0, 60e6) and "H200 SXM" in note

    args = bench.parse_args(["--quick", "--peak-gbps", "4000"])
    note = bench.resolve_peaks(args, "NVIDIA H200")
    assert (args.peak_tflops, args.peak_gbps) == (989.0, 4000.0) and "except --peak-gbps" in note

    args = bench.parse_args(["--quick"])  # a CPU or an unknown GPU: an H100 SXM's roofs, and the output says so
    note = bench.resolve_peaks(args, "cpu")
    assert (args.peak_tflops, args.peak_gbps, args.l2_bytes) == (989.0, 3350.0, 50e6) and "not a known GPU" in note
