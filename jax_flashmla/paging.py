"""On-demand paging inside one page shard: the array programs behind PagedKVCache.reserve and .release.

A shard's free pages are a stack, free_pages (n,) int32 of global ids whose first free_count entries are free (the
top, popped first, is the last of them). Everything is a few fused array ops with no loop over rows, so that a
decode step can reserve its pages at no visible cost; the cache vmaps these over its page shards (axis
"page_shard").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .constants import PAGE_SIZE


def reserve_in_shard(free_pages, free_count, table, end):
    """reserve within one page shard (vmapped over axis "page_shard"): free_pages (n,), free_count (), table
    (rows, max_pages), end (rows,) the lengths the rows must hold -> (table, free_count, granted (rows,)). An
    entry that is not a page of this shard counts as missing."""
    first_id = jax.lax.axis_index("page_shard") * free_pages.shape[0]
    column = jnp.arange(table.shape[1], dtype=jnp.int32)
    has_page = (table >= first_id) & (table - first_id < free_pages.shape[0])
    missing = (column[None, :] < (end[:, None] + PAGE_SIZE - 1) // PAGE_SIZE) & ~has_page
    need = missing.sum(axis=1, dtype=jnp.int32)  # sums below count table entries: fewer than 2**31 (create)
    granted = (need == 0) | (jnp.cumsum(need) <= free_count)  # a prefix of the rows that need pages
    take = missing & granted[:, None]
    # Row-major rank among the pages taken: the k-th comes from the stack's top minus k.
    rank = jnp.cumsum(take.reshape(-1), dtype=jnp.int32).reshape(take.shape) - 1
    popped = free_pages[jnp.clip(free_count - 1 - rank, 0, free_pages.shape[0] - 1)]
    return (jnp.where(take, popped, table).astype(jnp.int32),
            (free_count - take.sum(dtype=jnp.int32)).astype(jnp.int32), granted)


def release_in_shard(free_pages, free_count, table, rows):
    """release within one page shard (vmapped over axis "page_shard"): the pages of `rows` (rows,) bool in table
    (rows, max_pages), those of this shard, not already free and not named twice, pushed onto free_pages (n,)."""
    per_shard = free_pages.shape[0]
    first_id = jax.lax.axis_index("page_shard") * per_shard
    local = table.reshape(-1) - first_id
    named = jnp.repeat(rows, table.shape[1]) & (local >= 0) & (local < per_shard)
    local = jnp.where(named, local, per_shard)  # out of range: dropped by the scatters below
    is_free = jnp.zeros((per_shard,), jnp.bool_).at[
        jnp.where(jnp.arange(per_shard) < free_count, free_pages - first_id, per_shard)].set(True, mode="drop")
    position = jnp.arange(local.shape[0], dtype=jnp.int32)
    first = jnp.full((per_shard,), local.shape[0], jnp.int32).at[local].min(position, mode="drop")
    push = named & (first[jnp.minimum(local, per_shard - 1)] == position) & ~is_free[jnp.minimum(local, per_shard - 1)]
    slot = jnp.where(push, free_count + jnp.cumsum(push, dtype=jnp.int32) - 1, per_shard)
    free_pages = free_pages.at[slot].set(local + first_id, mode="drop")
    return free_pages, (free_count + push.sum(dtype=jnp.int32)).astype(jnp.int32)
