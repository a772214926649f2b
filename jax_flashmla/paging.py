"""On-demand paging inside one page shard: the array programs behind PagedKVCache.reserve, .release and .fork.

A shard's free pages are a stack, free_pages (n,) int32 of global ids whose first free_count entries are free (the
top, popped first, is the last of them). Everything is a few fused array ops with no loop over rows, so that a
decode step can reserve its pages at no visible cost; the cache vmaps these over its page shards (axis
"page_shard").

Rows may share pages (fork): the block table itself is the reference count. A page goes back to the stack when
no entry of its shard names it any more (_push_unnamed), and no token is ever written into a page that another
entry names (reserve gives a writer a page of its own first; write drops what would still land in one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .constants import PAGE_SIZE


def _local_ids(table, per_shard):
    """table entries as ids within this shard, and whether each names a page of it."""
    local = table - jax.lax.axis_index("page_shard") * per_shard
    return local, (local >= 0) & (local < per_shard)


def named_by_others(table, per_shard):
    """(rows, max_pages) bool: the entry names a page of this shard that another entry of the shard also names."""
    local, own = _local_ids(table, per_shard)
    index = jnp.where(own, local, per_shard).reshape(-1)  # out of range: dropped
    namers = jnp.zeros((per_shard,), jnp.int32).at[index].add(1, mode="drop")
    return own & (namers[jnp.minimum(index, per_shard - 1)].reshape(table.shape) > 1)


def writable(table, per_shard):
    """(rows, max_pages) bool: the entry names a page of this shard that no other entry names: a write may go
    there (an on-demand cache's write drops the rest)."""
    return _local_ids(table, per_shard)[1] & ~named_by_others(table, per_shard)


def _push_unnamed(free_pages, free_count, before, after):
    """Pushes the pages of this shard that `before` (a table) names and `after` does not, unless already free, each
    once, in row-major order of their first entry in `before`. So the stack never holds an id twice, whatever the
    tables hold."""
    per_shard = free_pages.shape[0]
    first_id = jax.lax.axis_index("page_shard") * per_shard
    local, own = _local_ids(before.reshape(-1), per_shard)
    local = jnp.where(own, local, per_shard)  # out of range: dropped by the scatters below
    after_local, after_own = _local_ids(after.reshape(-1), per_shard)
    named_after = jnp.zeros((per_shard,), jnp.bool_).at[jnp.where(after_own, after_local, per_shard)].set(
        True, mode="drop")
    is_free = jnp.zeros((per_shard,), jnp.bool_).at[
        jnp.where(jnp.arange(per_shard) < free_count, free_pages - first_id, per_shard)].set(True, mode="drop")
    position = jnp.arange(local.shape[0], dtype=jnp.int32)
    first = jnp.full((per_shard,), local.shape[0], jnp.int32).at[local].min(position, mode="drop")
    clipped = jnp.minimum(local, per_shard - 1)
    push = own & (first[clipped] == position) & ~is_free[clipped] & ~named_after[clipped]
    slot = jnp.where(push, free_count + jnp.cumsum(push, dtype=jnp.int32) - 1, per_shard)
    free_pages = free_pages.at[slot].set(local + first_id, mode="drop")
    return free_pages, (free_count + push.sum(dtype=jnp.int32)).astype(jnp.int32)


def _pop(free_pages, free_count, take):
    """Page ids for the True entries of take (rows, cols), the k-th in row-major order from the stack's top minus k
    (the caller keeps their number within free_count), and the count left."""
    rank = jnp.cumsum(take.reshape(-1), dtype=jnp.int32).reshape(take.shape) - 1
    popped = free_pages[jnp.clip(free_count - 1 - rank, 0, free_pages.shape[0] - 1)]
    return popped, (free_count - take.sum(dtype=jnp.int32)).astype(jnp.int32)


def reserve_in_shard(free_pages, free_count, table, start, end):
    """reserve within one page shard (vmapped over axis "page_shard"): free_pages (n,), free_count (), table
    (rows, max_pages), start and end (rows,) the lengths the rows hold and must hold -> (free_pages, table,
    free_count, granted (rows,)).

    An entry that is not a page of this shard counts as missing. A shared page (another entry names it) in a
    column past the row's tokens is dropped from the row first (-1), so that it holds up no other row; one the
    row will write (tokens start..end-1) is then replaced by a page of the row's own. Where that column also
    holds tokens below start (a shared partial page, after a rollback into shared pages or from a hand-made
    table), the tokens would have to be copied first: such a row is refused and takes nothing."""
    per_shard = free_pages.shape[0]
    column = jnp.arange(table.shape[1], dtype=jnp.int32)[None, :]
    past_tokens = column >= (start[:, None] + PAGE_SIZE - 1) // PAGE_SIZE
    original = table
    table = jnp.where(past_tokens & named_by_others(table, per_shard), -1, table)
    has_page = _local_ids(table, per_shard)[1]
    written = ((column >= start[:, None] // PAGE_SIZE) & (column < (end[:, None] + PAGE_SIZE - 1) // PAGE_SIZE)
               & (end > start)[:, None])
    shared_and_written = written & named_by_others(table, per_shard)
    holds_older_tokens = column * PAGE_SIZE < start[:, None]
    refused = (shared_and_written & holds_older_tokens).any(axis=1)
    missing = (column < (end[:, None] + PAGE_SIZE - 1) // PAGE_SIZE) & (~has_page | shared_and_written)
    missing &= ~refused[:, None]
    need = missing.sum(axis=1, dtype=jnp.int32)  # sums below count table entries: fewer than 2**31 (create)
    granted = ~refused & ((need == 0) | (jnp.cumsum(need) <= free_count))  # a prefix of the rows that need pages
    take = missing & granted[:, None]
    popped, free_count = _pop(free_pages, free_count, take)
    new_table = jnp.where(take, popped, table).astype(jnp.int32)
    # A shared page that every one of its namers gave up in this step is named by none: back to the stack.
    free_pages, free_count = _push_unnamed(free_pages, free_count, original, new_table)
    return free_pages, new_table, free_count, granted


def release_in_shard(free_pages, free_count, table, rows):
    """release within one page shard (vmapped over axis "page_shard"): the rows of `rows` (rows,) bool get empty
    tables; the pages of this shard they named that no other row names, not already free and not named twice,
    are pushed onto free_pages (n,). -> (free_pages, free_count, table)."""
    new_table = jnp.where(rows[:, None], -1, table).astype(jnp.int32)
    return (*_push_unnamed(free_pages, free_count, table, new_table), new_table)


def fork_in_shard(free_pages, free_count, table, lengths, sources):
    """fork within one page shard (vmapped over axis "page_shard"): row i with sources[i] = j (a row index within
    the shard, j != i) becomes a copy of row j as it was: j's length, j's pages for its full pages (shared, named
    by both), and a page of its own holding a copy of j's partial last page, if j has one on a page of this
    shard. Row i's own pages go back to the stack unless another row names them. sources[i] outside the shard's
    rows, or naming a row itself asked to become a copy, leaves row i as it is (not granted); so does a pool
    without the page it needs (rows served in order, as in reserve). -> (free_pages, free_count, table, lengths
    of the rows forked, forked (rows,) bool, granted, copy_from, copy_to), the last two (rows,) the page copies
    the caller must make (copy_to = -1 for none)."""
    rows, max_pages = table.shape
    per_shard = free_pages.shape[0]
    asked = (sources >= 0) & (sources < rows) & (sources != jnp.arange(rows))
    source = jnp.clip(sources, 0, rows - 1)
    forked = asked & ~asked[source]
    source_table = table[source]
    source_own = _local_ids(source_table, per_shard)[1]
    length = lengths[source]  # already clipped to [0, capacity] by the caller
    column = jnp.arange(max_pages, dtype=jnp.int32)[None, :]
    full = column < (length // PAGE_SIZE)[:, None]
    partial = (column == (length // PAGE_SIZE)[:, None]) & (length % PAGE_SIZE != 0)[:, None]
    need_copy = forked & (partial & source_own).any(axis=1)
    granted_page = ~need_copy | (jnp.cumsum(need_copy) <= free_count)
    done = forked & granted_page
    take = partial & source_own & (done & need_copy)[:, None]
    popped, free_count = _pop(free_pages, free_count, take)
    forked_table = jnp.where(full & source_own, source_table, jnp.where(take, popped, -1))
    new_table = jnp.where(done[:, None], forked_table, table).astype(jnp.int32)
    copy_from = jnp.where(take, source_table, -1).max(axis=1)
    copy_to = jnp.where(take, popped, -1).max(axis=1)
    free_pages, free_count = _push_unnamed(free_pages, free_count, table, new_table)
    return (free_pages, free_count, new_table, length.astype(jnp.int32), done, ~asked | done,
            copy_from.astype(jnp.int32), copy_to.astype(jnp.int32))
