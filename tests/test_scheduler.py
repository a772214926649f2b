"""The split-KV schedule (scheduler.py, the spec the CUDA scheduler must equal) covers every block once."""

import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla.constants import NARROW_SPLIT_OVERHEAD_BLOCKS, PAGE_SIZE, SPLIT_OVERHEAD_BLOCKS
from jax_flashmla.scheduler import max_scheduled_blocks, num_parts_for, schedule, split_overhead_for

from cases import INT32_MAX, INT32_MIN


def coverage(metadata, seqlens):
    """Per sequence, the (block_begin, block_end, local split) chunks the parts will process."""
    n = -(-np.clip(np.asarray(seqlens, np.int64), 0, PAGE_SIZE * max_scheduled_blocks(len(seqlens))) // PAGE_SIZE)
    chunks = {i: [] for i in range(len(seqlens))}
    for batch_begin, block_begin, batch_end, block_end, split_begin, *rest in metadata:
        assert rest == [0, 0, 0]
        for i in range(batch_begin, batch_end + 1):
            chunks[i].append((block_begin if i == batch_begin else 0, block_end if i == batch_end else n[i],
                              split_begin if i == batch_begin else 0))
    return n, chunks


CHARGES = (1, NARROW_SPLIT_OVERHEAD_BLOCKS, SPLIT_OVERHEAD_BLOCKS)  # blocks charged per split: least, narrow, seesaw


def random_schedule(seed):
    """(seqlens, num_parts, metadata, num_splits) for a random batch: empty and negative lengths included; the
    charge per split cycles through CHARGES with the seed."""
    rng = np.random.default_rng(seed)
    batch, num_parts = int(rng.integers(1, 60)), int(rng.integers(1, 140))
    seqlens = rng.integers(-3, 5000, batch).astype(np.int32)
    seqlens[rng.random(batch) < 0.2] = 0
    metadata, num_splits = (np.asarray(x) for x in jax.jit(schedule, static_argnums=(1, 2))(
        seqlens, num_parts, CHARGES[seed % len(CHARGES)]))
    return seqlens, num_parts, metadata, num_splits


@pytest.mark.parametrize("trial", range(40))
def test_every_block_once_and_split_counts_agree(trial):
    check_every_block_once(*random_schedule(trial))


def check_every_block_once(seqlens, num_parts, metadata, num_splits):
    batch = len(seqlens)
    assert metadata.shape == (num_parts, 8) and num_splits.shape == (batch + 1,)
    assert num_splits[0] == 0 and num_splits[-1] <= batch + num_parts  # fits the partial buffers
    n, chunks = coverage(metadata.tolist(), seqlens)
    for i in range(batch):
        got = chunks[i]
        assert len(got) == num_splits[i + 1] - num_splits[i] >= 1
        assert [t for _, _, t in got] == list(range(len(got)))
        if n[i] == 0:
            assert got == [(0, 0, 0)]  # someone writes out = 0, lse = +inf
        else:
            assert got[0][0] == 0 and got[-1][1] == n[i]
            assert all(a_end == b_begin for (_, a_end, _), (b_begin, _, _) in zip(got, got[1:]))
            assert all(end > begin for begin, end, _ in got)


@pytest.mark.parametrize("trial", range(20))
def test_each_split_sequence_has_one_combining_part(trial):
    """The combine kernel's grid is one column per part: a part combines its first sequence when its
    split_begin is 1. That must name every sequence with more than one split exactly once, and nothing else."""
    seqlens, _, metadata, num_splits = random_schedule(100 + trial)
    batch = len(seqlens)
    combined = sorted(int(md[0]) for md in metadata if md[4] == 1)
    split = [i for i in range(batch) if num_splits[i + 1] - num_splits[i] > 1]
    assert combined == split


@pytest.mark.parametrize("charge", CHARGES)
@pytest.mark.parametrize("batch,num_parts", [(1, 1), (4, 132), (63, 132), (64, 33), (128, 132), (1000, 7)])
def test_lengths_near_int32_max(batch, num_parts, charge):
    """Lengths up to INT32_MAX are clipped to max_scheduled_blocks(b) pages, which keeps every count in int32:
    the schedule still covers each (clipped) sequence once, whatever the batch. Before the clip, a length of
    INT32_MAX made (L + 63) // 64 wrap and the schedule left the other sequences to no part."""
    rng = np.random.default_rng([batch, num_parts])
    extremes = np.array([INT32_MAX, INT32_MAX - 63, 2**30 + 1, 2**30, 2**30 - 1, INT32_MIN, -1, 0, 1, 64, 65])
    seqlens = rng.choice(extremes, batch).astype(np.int32)
    seqlens[0] = INT32_MAX
    scheduled = jax.jit(schedule, static_argnums=(1, 2))
    metadata, num_splits = (np.asarray(x) for x in scheduled(seqlens, num_parts, charge))
    check_every_block_once(seqlens, num_parts, metadata, num_splits)
    everyone_long = np.full(batch, INT32_MAX, np.int32)  # the largest total: b * (cap + charge) units
    metadata, num_splits = (np.asarray(x) for x in scheduled(everyone_long, num_parts, charge))
    check_every_block_once(everyone_long, num_parts, metadata, num_splits)


def test_max_scheduled_blocks():
    """b * (blocks + overhead) <= 2**30, and never more than a block table may have."""
    assert max_scheduled_blocks(1) == max_scheduled_blocks(63) == 2**24
    assert max_scheduled_blocks(128) == 2**30 // 128 - 5 == 8_388_603
    for batch in (1, 64, 128, 1000, 178_956_970):
        assert batch * (max_scheduled_blocks(batch) + 5) <= 2**30 and max_scheduled_blocks(batch) >= 1
    for batch in (0, 178_956_971):
        with pytest.raises(ValueError, match="a schedule covers 1 to 178956970 sequences"):
            max_scheduled_blocks(batch)


@pytest.mark.parametrize("charge", CHARGES)
def test_balanced_by_tokens(charge):
    """One long sequence among short ones is cut into many splits; no part gets much more than its share."""
    seqlens = np.array([64 * 1000] + [64] * 31, np.int32)
    metadata, num_splits = (np.asarray(x) for x in schedule(jnp.asarray(seqlens), 132, charge))
    assert num_splits[1] - num_splits[0] > 100
    work = [(md[3] - md[1]) if md[0] == md[2] else 0 for md in metadata]
    assert max(work) <= -(-(1000 + 31 + 32 * charge) // 132) + 1


def test_num_parts_fill_the_sms():
    assert num_parts_for(132, 1, 16, 64) == 132
    assert num_parts_for(132, 1, 256, 64) == 33  # s_q 2, h_q 128: 4 row blocks
    assert num_parts_for(132, 2, 256, 64) == 16
    assert num_parts_for(4, 8, 64, 64) == 1
    md, splits = jfm.get_mla_metadata(jnp.array([5, 6], jnp.int32), 128, 1, num_sms=66)
    assert md.shape == (33, 8) and splits.shape == (3,)


def test_charge_per_split_follows_the_kernel():
    """Head groups of at most 32 query rows (the narrow kernel's) are charged 2 blocks a split, wider ones (the
    seesaw's) 5; get_mla_metadata schedules with the charge of the rows it is given."""
    assert [split_overhead_for(rows) for rows in (1, 16, 32, 33, 64, 256)] == [2, 2, 2, 5, 5, 5]
    seqlens = jnp.asarray(np.random.default_rng(3).integers(0, 9000, 40), jnp.int32)
    for rows, parts, charge in ((16, 132, 2), (32, 132, 2), (128, 66, 5)):
        got = jfm.get_mla_metadata(seqlens, rows, 1, num_sms=132)
        want = schedule(seqlens, parts, charge)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{rows} rows")
    # The charges differ where it matters: the narrow one cuts the same batch at other blocks.
    assert not np.array_equal(np.asarray(schedule(seqlens, 132, 2)[0]), np.asarray(schedule(seqlens, 132, 5)[0]))


def test_a_smaller_charge_evens_the_parts_for_a_cheap_split():
    """What the narrow kernel's charge buys (benchmarks/NOTES.md, version 2.22): where a split really costs about
    one block, the busiest part's blocks plus splits exceed the mean by less with a charge of 2 than with 5."""
    rng = np.random.default_rng([128, 4096])
    seqlens = np.clip(rng.normal(4096, 2048, 128), 1, 8192).astype(np.int32)

    def busiest_over_mean(charge):
        metadata = np.asarray(schedule(jnp.asarray(seqlens), 132, charge)[0]).tolist()
        n, _ = coverage(metadata, seqlens)
        work = [sum((block_end if i == batch_end else n[i]) - (block_begin if i == batch_begin else 0) + 1
                    for i in range(batch_begin, batch_end + 1))  # each split's blocks, and one block for the split
                for batch_begin, block_begin, batch_end, block_end, *_ in metadata]
        return max(work) / np.mean(work)

    assert busiest_over_mean(2) < busiest_over_mean(5) - 0.02


@pytest.mark.parametrize("charge", [0, 6, -1, True, 2.0, "2"])
def test_a_charge_out_of_range_is_refused(charge):
    """By the spec and by the primitive's abstract evaluation (so at trace time, before any lowering)."""
    seqlens = jnp.asarray([5, 70], jnp.int32)
    with pytest.raises(ValueError, match=r"split_overhead must be an int in \[1, 5\]"):
        schedule(seqlens, 4, charge)
    with pytest.raises(ValueError, match=r"split_overhead must be an int in \[1, 5\]"):
        jax.eval_shape(lambda s: jfm.primitives.mla_metadata_p.bind(s, num_parts=4, split_overhead=charge), seqlens)


def test_cuda_walk_on_the_host_matches_spec(tmp_path, cuda_build_tools):
    """src/kernels/scheduler.cu's walk (the code its kernel's thread 0 runs), compiled for the host by
    tests/host/scheduler_walk.cu, gives the spec's integers: random batches, lengths near the int32 limits, lines
    so short that parts hold a unit or two, every charge. (The kernel itself is compared on a GPU by
    test_metadata_kernel_matches_spec.)"""
    nvcc, _ = cuda_build_tools
    root = pathlib.Path(__file__).resolve().parents[1]
    binary = tmp_path / "scheduler_walk"
    build = subprocess.run([nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-O1", f"-I{root / 'src'}",
                            str(root / "tests" / "host" / "scheduler_walk.cu"), "-o", str(binary)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    rng = np.random.default_rng(11)
    extremes = np.array([INT32_MAX, INT32_MAX - 63, 2**30 + 1, INT32_MIN, -1, 0, 1, 64, 65], np.int32)
    cases = []
    for trial in range(120):
        batch, num_parts = int(rng.integers(1, 300)), int(rng.integers(1, 140))
        seqlens = rng.integers(-10, 20000, batch).astype(np.int32)
        seqlens[rng.random(batch) < 0.2] = 0
        if trial % 4 == 1:
            seqlens = rng.integers(0, 130, batch).astype(np.int32)  # short lines: parts of a unit or two
        if trial % 4 == 2:
            extreme = rng.random(batch) < 0.2
            seqlens[extreme] = rng.choice(extremes, int(extreme.sum()))
        cases.append((seqlens, num_parts, CHARGES[trial % 3]))
    cases.append((np.full(5000, 4096, np.int32), 132, 2))  # more lengths than the kernel stages at once
    stdin = "".join(f"{len(s)} {p} {c} {' '.join(map(str, s))}\n" for s, p, c in cases)
    stdin += "3 5 6 1 2 3\n"  # a charge past the limit: refused, as by launch_scheduler
    run = subprocess.run([binary], input=stdin, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == len(cases) + 1 and lines[-1] == "invalid"
    scheduled = jax.jit(schedule, static_argnums=(1, 2))
    for (seqlens, num_parts, charge), line in zip(cases, lines):
        got = np.array(line.split(), np.int64)
        md, splits = (np.asarray(x) for x in scheduled(seqlens, num_parts, charge))
        what = f"b={len(seqlens)} P={num_parts} charge={charge}"
        np.testing.assert_array_equal(got[:md.size].reshape(md.shape), md, err_msg=what)
        np.testing.assert_array_equal(got[md.size:], splits, err_msg=what)
