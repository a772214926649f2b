"""Split-KV scheduling: which part of the GPU grid handles which blocks of which sequence.

This module is the executable specification of the algorithm; the CUDA scheduler kernel
(src/kernels/scheduler.cu) computes the same integers, and the GPU tests check they are identical.

Each sequence i has n_i = ceil(L_i / 64) KV blocks, L_i clipped to [0, 64 * max_scheduled_blocks(b)] (below),
and costs c_i = n_i + OVERHEAD units (OVERHEAD models the fixed work of a split: loading q, writing out; it
depends on the kernel that will run, split_overhead_for below). Lay
all costs end to end, C_i the start of sequence i, T the total, and cut the line into num_parts equal pieces of
S = ceil(T / num_parts) units. Block k of sequence i sits at unit C_i + OVERHEAD + k and belongs to part
floor(unit / S). A sequence therefore spans parts first_i..last_i, one split per part, and every split holds at
least one block. An empty sequence (n_i = 0) is given to the part holding its last overhead unit, so that someone
writes its out = 0, lse = +inf.

Everything is counted in int32, on the GPU as here. Clipping the lengths keeps T <= 2**30 (SCHEDULE_UNIT_LIMIT)
(for every OVERHEAD up to SPLIT_OVERHEAD_BLOCKS, which the clip assumes)
and the part arithmetic (part * S, below T + num_parts) inside int32 for any int32 length. The clip cannot cut a
block the decode reads: the decode clips L_i to 64 * max_pages_per_seq, and validation refuses a block table
wider than max_scheduled_blocks(b).

Outputs (FlashMLA's names): tile_scheduler_metadata (num_parts, 8) int32 rows
[batch_begin, block_begin, batch_end, block_end, split_begin, 0, 0, 0] and num_splits (b + 1,) int32 prefix
sums of the per-sequence split counts. src/mla_params.h documents how the kernels read them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .constants import (MAX_PAGES_PER_SEQ, MAX_SCHEDULED_BATCH, METADATA_ROW_INTS, NARROW_MAX_QUERY_ROWS,
                        NARROW_SPLIT_OVERHEAD_BLOCKS, PAGE_SIZE, SCHEDULE_UNIT_LIMIT, SPLIT_OVERHEAD_BLOCKS)


def num_parts_for(num_sms: int, num_heads_k: int, num_q_tokens_per_head_k: int, block_m: int) -> int:
    """How many parts to cut the KV work into so that parts x heads x row-blocks fill the SMs once."""
    row_blocks = -(-num_q_tokens_per_head_k // block_m)
    return max(num_sms // (num_heads_k * row_blocks), 1)


def split_overhead_for(num_q_tokens_per_head_k: int) -> int:
    """What a split costs, in blocks, for the kernel that serves head groups of this many query rows on Hopper: the
    narrow kernel keeps its page stream going across a split's end (the next split's Q and pages load during the
    epilogue), so a split costs it less than the seesaw, and charging it the seesaw's 5 left its longest parts
    finishing late (1-2% of the memory rows' time on an H100, benchmarks/NOTES.md version 2.22). The rows alone
    decide: where another kernel serves them (the JAX_FLASHMLA_DECODE_KERNEL switches, head dim 512, a GPU the
    kernels were not built for), its splits are charged the same."""
    if num_q_tokens_per_head_k <= NARROW_MAX_QUERY_ROWS:
        return NARROW_SPLIT_OVERHEAD_BLOCKS
    return SPLIT_OVERHEAD_BLOCKS


def check_split_overhead(split_overhead) -> int:
    """The charge as an int in [1, SPLIT_OVERHEAD_BLOCKS]: an empty sequence sits in its split's last unit, and the
    length clip (max_scheduled_blocks) holds for charges up to SPLIT_OVERHEAD_BLOCKS."""
    if isinstance(split_overhead, bool) or not isinstance(split_overhead, (int, np.integer)) or not (
            1 <= split_overhead <= SPLIT_OVERHEAD_BLOCKS):
        raise ValueError(f"split_overhead must be an int in [1, {SPLIT_OVERHEAD_BLOCKS}], got {split_overhead!r}")
    return int(split_overhead)


def max_scheduled_blocks(batch: int) -> int:
    """The most blocks of one sequence a schedule of `batch` sequences counts: b * (blocks + overhead) stays
    within SCHEDULE_UNIT_LIMIT. It is 2**24 (MAX_PAGES_PER_SEQ) up to 63 sequences, 8,388,603 at 128."""
    if not 1 <= batch <= MAX_SCHEDULED_BATCH:
        raise ValueError(f"a schedule covers 1 to {MAX_SCHEDULED_BATCH} sequences, got {batch}")
    return min(MAX_PAGES_PER_SEQ, SCHEDULE_UNIT_LIMIT // batch - SPLIT_OVERHEAD_BLOCKS)


def schedule(cache_seqlens: jnp.ndarray, num_parts: int, split_overhead: int):
    """Reference scheduler in jnp. cache_seqlens (b,) int32 -> (tile_metadata (P, 8), num_splits (b+1,)), each
    split charged split_overhead blocks (no default: the charge belongs to the kernel, split_overhead_for)."""
    overhead = check_split_overhead(split_overhead)
    max_tokens = PAGE_SIZE * max_scheduled_blocks(cache_seqlens.shape[0])
    seqlens = jnp.clip(cache_seqlens.astype(jnp.int32), 0, max_tokens)  # (seqlens + 63) // 64 cannot overflow
    n = (seqlens + PAGE_SIZE - 1) // PAGE_SIZE  # blocks per sequence
    cost = n + overhead
    start = jnp.cumsum(cost) - cost  # C_i
    total = jnp.sum(cost)
    part_size = (total + num_parts - 1) // num_parts  # S
    first_block_unit = start + overhead
    first = (first_block_unit - (n == 0).astype(jnp.int32)) // part_size
    last = (first_block_unit + n - 1) // part_size
    splits = last - first + 1
    num_splits = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(splits).astype(jnp.int32)])

    parts = jnp.arange(num_parts, dtype=jnp.int32)
    batch = seqlens.shape[0]
    batch_begin = jnp.searchsorted(last, parts, side="left").astype(jnp.int32)  # first i with last_i >= p
    batch_end = (jnp.searchsorted(first, parts, side="right") - 1).astype(jnp.int32)  # last i, first_i <= p
    bb = jnp.clip(batch_begin, 0, batch - 1)
    be = jnp.clip(batch_end, 0, batch - 1)
    busy = batch_begin <= batch_end  # idle parts get rows [b_begin, 0, b_end, 0, 0, ...]
    has_begin = busy & (batch_begin < batch)
    has_end = busy & (batch_end >= 0)
    block_begin = jnp.where(has_begin, jnp.maximum(parts * part_size - first_block_unit[bb], 0), 0)
    block_end = jnp.where(has_end, jnp.minimum(n[be], (parts + 1) * part_size - first_block_unit[be]), 0)
    split_begin = jnp.where(has_begin, parts - first[bb], 0)
    zeros = jnp.zeros_like(parts)
    rows = [batch_begin, block_begin, batch_end, block_end, split_begin] + [zeros] * (METADATA_ROW_INTS - 5)
    return jnp.stack(rows, axis=1).astype(jnp.int32), num_splits
