"""On-demand paging (PagedKVCache.create(on_demand=True), reserve, release): against a plain-Python allocator
written from the docstrings, step for step over random workloads; its invariants (every page either free or in
one table entry, each row's pages in its own shard); hostile tables; and what is read back through the pages.
The mesh test (a stack per batch shard) is in test_model.py with the other mesh tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla.constants import PAGE_SIZE
from jax_flashmla.reference import gather_pages


class PythonAllocator:
    """The specification, one row and one page at a time: a stack (list, top last) of free ids per shard. Rows may
    share pages (fork); the table is the reference count."""

    def __init__(self, batch, max_pages, num_pages, shards):
        self.per_shard, self.rows_per_shard, self.num_pages = num_pages // shards, batch // shards, num_pages
        self.table = np.full((batch, max_pages), -1, np.int64)
        self.lengths = np.zeros(batch, np.int64)
        self.stacks = [list(range((s + 1) * self.per_shard - 1, s * self.per_shard - 1, -1)) for s in range(shards)]

    @property
    def capacity(self):
        return self.table.shape[1] * PAGE_SIZE

    def rows(self, shard):
        return range(shard * self.rows_per_shard, (shard + 1) * self.rows_per_shard)

    def own(self, shard, page):
        return shard * self.per_shard <= page < (shard + 1) * self.per_shard

    def push_unnamed(self, shard, before):
        """Pages of the shard that `before` (the shard's rows of the table) named and the table no longer does."""
        named_now = {int(p) for row in self.rows(shard) for p in self.table[row]}
        for page in before.ravel():
            page = int(page)
            if self.own(shard, page) and page not in named_now and page not in self.stacks[shard]:
                self.stacks[shard].append(page)

    def namers(self, shard):
        counts = {}
        for row in self.rows(shard):
            for page in self.table[row]:
                if self.own(shard, page):
                    counts[int(page)] = counts.get(int(page), 0) + 1
        return counts

    def reserve(self, num_new):
        granted = np.zeros(len(self.lengths), bool)
        for shard, stack in enumerate(self.stacks):
            before = self.table[list(self.rows(shard))].copy()
            namers = self.namers(shard)
            for row in self.rows(shard):  # shared pages past a row's tokens leave it first
                start = min(max(self.lengths[row], 0), self.capacity)
                for c in range(-(-start // PAGE_SIZE), self.table.shape[1]):
                    if namers.get(int(self.table[row, c]), 0) > 1:
                        self.table[row, c] = -1
            namers = self.namers(shard)
            blocked = False
            for row in self.rows(shard):
                start = min(max(self.lengths[row], 0), self.capacity)
                end = start + min(max(num_new[row], 0), self.capacity - start)
                written = range(start // PAGE_SIZE, -(-end // PAGE_SIZE)) if end > start else range(0)
                shared = [c for c in written if namers.get(int(self.table[row, c]), 0) > 1]
                if any(c * PAGE_SIZE < start for c in shared):
                    continue  # a shared page holding older tokens: refused, blocking no one
                missing = [c for c in range(-(-end // PAGE_SIZE))
                           if not self.own(shard, self.table[row, c]) or c in shared]
                if not missing:
                    granted[row] = True
                elif not blocked and len(missing) <= len(stack):
                    for column in missing:
                        self.table[row, column] = stack.pop()
                    granted[row] = True
                else:
                    blocked = True
            self.push_unnamed(shard, before)
        return granted

    def advance(self, num_new):
        base = np.clip(self.lengths, 0, self.capacity)
        self.lengths = base + np.clip(num_new, -base, self.capacity - base)

    def release(self, rows):
        for shard in range(len(self.stacks)):
            before = self.table[list(self.rows(shard))].copy()
            for row in self.rows(shard):
                if rows[row]:
                    self.table[row] = -1
                    self.lengths[row] = 0
            self.push_unnamed(shard, before)

    def fork(self, sources):
        """-> granted, and the (source page, copy) pairs whose tokens were copied."""
        granted = np.ones(len(self.lengths), bool)
        copies = []
        old_table, old_lengths = self.table.copy(), np.clip(self.lengths, 0, self.capacity)
        shard_of = lambda row: row // self.rows_per_shard  # noqa: E731
        # Rows asked to copy a row of their own shard: such a source cannot itself be a copy (it is as it was).
        asked = {row: int(src) for row, src in enumerate(sources)
                 if 0 <= src < len(sources) and src != row and shard_of(src) == shard_of(row)}
        for shard, stack in enumerate(self.stacks):
            before = self.table[list(self.rows(shard))].copy()
            blocked = False
            for row in self.rows(shard):
                if sources[row] >= 0 and sources[row] != row and row not in asked:
                    granted[row] = False  # a source in another shard, or no row at all
                if row not in asked:
                    continue
                source = asked[row]
                if source in asked:
                    granted[row] = False
                    continue
                length = old_lengths[source]
                full, partial = divmod(length, PAGE_SIZE)
                last = old_table[source, full] if partial else -1
                needs_page = partial and self.own(shard, last)
                if needs_page and (blocked or not stack):
                    blocked = True
                    granted[row] = False
                    continue
                self.table[row] = -1
                for c in range(full):
                    if self.own(shard, old_table[source, c]):
                        self.table[row, c] = old_table[source, c]
                if needs_page:
                    self.table[row, full] = stack.pop()
                    copies.append((int(last), int(self.table[row, full])))
                self.lengths[row] = length
            self.push_unnamed(shard, before)
        return granted, copies


def assert_same_state(cache, spec):
    np.testing.assert_array_equal(np.asarray(cache.block_table), spec.table)
    np.testing.assert_array_equal(np.asarray(cache.seqlens), spec.lengths)
    count = np.asarray(cache.free_count)
    assert count.tolist() == [len(stack) for stack in spec.stacks]
    for shard, stack in enumerate(spec.stacks):
        assert np.asarray(cache.free_pages)[shard, : count[shard]].tolist() == stack


def assert_pages_accounted(cache):
    """With shared pages: every page id is free or named by some entry, never both, none is on a stack twice, and
    a row names only its shard's pages."""
    table, free_pages, count = map(np.asarray, (cache.block_table, cache.free_pages, cache.free_count))
    shards, per_shard = free_pages.shape
    used = set(table[table >= 0].tolist())
    free = np.concatenate([free_pages[s, : count[s]] for s in range(shards)]).tolist()
    assert len(free) == len(set(free)) and not used & set(free)
    assert used | set(free) == set(range(shards * per_shard))
    shard_of_row = np.arange(table.shape[0])[:, None] // (table.shape[0] // shards)
    assert np.all((table < 0) | (table // per_shard == shard_of_row))


def assert_each_page_once(cache):
    """Every page id is either free or named by exactly one table entry, and a row names only its shard's pages."""
    table, free_pages, count = map(np.asarray, (cache.block_table, cache.free_pages, cache.free_count))
    shards, per_shard = free_pages.shape
    used = table[table >= 0]
    free = np.concatenate([free_pages[s, : count[s]] for s in range(shards)])
    np.testing.assert_array_equal(np.sort(np.concatenate([used, free])), np.arange(shards * per_shard))
    shard_of_row = np.arange(table.shape[0])[:, None] // (table.shape[0] // shards)
    assert np.all((table < 0) | (table // per_shard == shard_of_row))


def assert_same_decode(paged, static, q, dv):
    """A causal decode of q (b, s_q, h_q, d) over each cache: out and lse bit for bit the same, and not all NaN."""
    outs = []
    for cache in (static, paged):
        md, splits = jfm.get_mla_metadata(cache.seqlens, q.shape[1] * q.shape[2], 1)
        outs.append(jfm.flash_mla_with_kvcache(q, cache.layer_pages(0), cache.block_table, cache.seqlens, dv, md,
                                               splits, causal=True))
    for got, want in zip(outs[1], outs[0]):
        assert np.isfinite(np.asarray(want, np.float32)).any()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


reserve_jit = jax.jit(lambda cache, n: cache.reserve(n))
release_jit = jax.jit(lambda cache, rows: cache.release(rows))
advance_jit = jax.jit(lambda cache, n: cache.advance(n))


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reserve_and_release_follow_the_python_allocator(shards, seed):
    """Random workloads on a pool too small for every row at once: the jitted reserve, advance and release give
    the specification's tables, lengths, grants and free stacks at every step."""
    rng = np.random.default_rng(seed)
    batch, max_pages, num_pages = 6, 5, 6 * shards
    cache = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=max_pages * PAGE_SIZE, head_dim=8,
                                    num_pages=num_pages, on_demand=True, page_shards=shards)
    spec = PythonAllocator(batch, max_pages, num_pages, shards)
    grants = []
    for _ in range(60):
        op = rng.choice(["reserve", "advance", "release"], p=[0.5, 0.3, 0.2])
        if op == "reserve":
            num_new = rng.integers(-20, 3 * PAGE_SIZE, batch).astype(np.int32)
            if rng.random() < 0.1:
                num_new[rng.integers(batch)] = 2**31 - 1
            cache, granted = reserve_jit(cache, jnp.asarray(num_new))
            np.testing.assert_array_equal(np.asarray(granted), spec.reserve(num_new))
            grants.append(np.asarray(granted))
        elif op == "advance":
            num_new = rng.integers(-30, 2 * PAGE_SIZE, batch).astype(np.int32)
            cache = advance_jit(cache, jnp.asarray(num_new))
            spec.advance(num_new)
        else:
            rows = rng.random(batch) < 0.4
            cache = release_jit(cache, jnp.asarray(rows))
            spec.release(rows)
        assert_same_state(cache, spec)
        assert_each_page_once(cache)
    grants = np.array(grants)
    assert grants.any() and not grants.all()  # the workload both served rows and ran out of pages


fork_jit = jax.jit(lambda cache, sources: cache.fork(sources))


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_forks_with_reserve_advance_and_release_follow_the_python_allocator(shards, seed):
    """Forks (a shared prefix) among reserves, rollbacks into the shared pages and releases: the jitted ops give
    the specification's tables, lengths, grants, free stacks and page copies at every step, and no page is both
    free and named."""
    rng = np.random.default_rng([seed, shards])
    batch, max_pages, num_pages = 6, 5, 14 * shards
    cache = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=max_pages * PAGE_SIZE, head_dim=8,
                                    num_pages=num_pages, on_demand=True, page_shards=shards)
    spec = PythonAllocator(batch, max_pages, num_pages, shards)
    seen = {"fork": 0, "fork refused": 0, "copy": 0, "shared": 0}
    for _ in range(80):
        op = rng.choice(["reserve", "advance", "release", "fork"], p=[0.35, 0.2, 0.15, 0.3])
        if op == "reserve":  # and, mostly, advance the rows served by what they reserved, as append does
            num_new = rng.integers(-5, PAGE_SIZE + 20, batch).astype(np.int32)
            cache, granted = reserve_jit(cache, jnp.asarray(num_new))
            want = spec.reserve(num_new)
            np.testing.assert_array_equal(np.asarray(granted), want)
            if rng.random() < 0.7:
                cache = advance_jit(cache, jnp.asarray(np.where(want, num_new, 0)))
                spec.advance(np.where(want, num_new, 0))
        elif op == "advance":
            num_new = rng.integers(-90, 40, batch).astype(np.int32)  # rollbacks into shared pages, and past pages
            cache = advance_jit(cache, jnp.asarray(num_new))
            spec.advance(num_new)
        elif op == "release":
            rows = rng.random(batch) < 0.3
            cache = release_jit(cache, jnp.asarray(rows))
            spec.release(rows)
        else:
            sources = np.where(rng.random(batch) < 0.4, rng.integers(-2, batch + 1, batch), -1).astype(np.int32)
            cache, granted = fork_jit(cache, jnp.asarray(sources))
            want, copies = spec.fork(sources)
            np.testing.assert_array_equal(np.asarray(granted), want)
            seen["fork"] += int((want & (sources >= 0) & (sources != np.arange(batch))).sum())
            seen["fork refused"] += int((~want).sum())
            seen["copy"] += len(copies)
        assert_same_state(cache, spec)
        assert_pages_accounted(cache)
        used = np.asarray(cache.block_table)
        seen["shared"] += len(used[used >= 0]) - len(set(used[used >= 0].tolist()))
    # The workload forked, refused forks, copied pages and shared pages (rows refused at a shared partial page:
    # the next test).
    assert all(seen[key] for key in ("fork", "fork refused", "copy", "shared")), seen


def test_forked_rows_read_the_prefix_and_then_their_own_tokens():
    """A prompt of 100 tokens forked into two more rows: the full page is shared, the partial one copied; each row
    then appends its own tokens and reads back the prompt and its own tokens, none of another row's. Releasing
    the first row keeps the page the others still name. A row rolled back into the shared page is refused and
    writes nothing there."""
    rng = np.random.default_rng(0)
    d = 8
    cache = jfm.PagedKVCache.create(batch_size=3, max_seq_len=256, head_dim=d, num_pages=12, on_demand=True,
                                    dtype=jnp.float32)
    prompt = rng.standard_normal((3, 100, 1, d)).astype(np.float32)
    cache = cache.append(jnp.asarray(prompt), num_new=jnp.array([100, 0, 0]))
    cache, granted = cache.fork(jnp.array([-1, 0, 0]))
    assert granted.tolist() == [True, True, True] and cache.seqlens.tolist() == [100, 100, 100]
    table = np.asarray(cache.block_table)
    assert table[0, 0] == table[1, 0] == table[2, 0]  # the full page, shared
    assert len({table[0, 1], table[1, 1], table[2, 1]}) == 3  # the partial page, one each
    expected = [list(prompt[0, :100]) for _ in range(3)]
    for step in range(3):  # 3 x 20 tokens: the rows cross into page 2, each into a page of its own
        kv = rng.standard_normal((3, 20, 1, d)).astype(np.float32)
        cache = cache.append(jnp.asarray(kv))
        for row in range(3):
            expected[row] += list(kv[row])
    assert cache.seqlens.tolist() == [160, 160, 160]

    def check_rows(cache, rows):
        keys, valid = gather_pages(cache.pages[0], cache.block_table)
        for row in rows:
            length = int(cache.seqlens[row])
            assert np.asarray(valid[row, :length]).all()
            np.testing.assert_array_equal(np.asarray(keys[row, :length]), np.array(expected[row][:length]))

    check_rows(cache, range(3))
    released = cache.release(jnp.array([True, False, False]))
    assert table[0, 0] not in np.asarray(released.free_pages)[0, : int(released.free_count[0])]
    check_rows(released, [1, 2])
    # Row 1 rolls back to 30 tokens, inside the shared page, and asks for 5 more: refused, nothing written.
    rolled = released.advance(jnp.array([0, -130, 0]))
    appended = rolled.append(jnp.ones((3, 5, 1, d), jnp.float32), num_new=jnp.array([0, 5, 0]))
    assert appended.seqlens.tolist() == [0, 30, 160]
    direct = rolled.write(jnp.ones((3, 5, 1, d), jnp.float32))  # write without reserve: dropped there too
    check_rows(dataclasses.replace(appended, seqlens=jnp.array([0, 160, 160], jnp.int32)), [1, 2])
    check_rows(dataclasses.replace(direct, seqlens=jnp.array([0, 160, 160], jnp.int32)), [1, 2])
    # Once row 2 is released, row 1 alone names the page and writes into it.
    alone = rolled.release(jnp.array([False, False, True])).append(jnp.ones((3, 5, 1, d), jnp.float32),
                                                                    num_new=jnp.array([0, 5, 0]))
    assert alone.seqlens.tolist() == [0, 35, 0]
    keys, _ = gather_pages(alone.pages[0], alone.block_table)
    np.testing.assert_array_equal(np.asarray(keys[1, 30:35]), 1.0)


def test_shared_pages_hold_up_no_row_and_take_no_foreign_writes():
    """A row rolled back out of a shared page lets go of it at the next reserve, so the row still inside it can
    grow; a reserve of 0 tokens is granted to a row inside a shared page; a hand-made table naming another
    shard's page takes no write there (one device); fork leaves other rows' lengths as they were, even out of
    range, and a source of 2**32 given as int64 is refused, not wrapped to row 0."""
    d = 2
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=256, head_dim=d, num_pages=6, on_demand=True,
                                    dtype=jnp.float32)
    cache = cache.append(jnp.full((2, 100, 1, d), 7.0), num_new=jnp.array([100, 0]))
    cache, _ = cache.fork(jnp.array([-1, 0]))
    rolled = cache.advance(jnp.array([-70, -100]))  # row 0 at 30 (inside the shared page 0), row 1 at 0
    _, granted = rolled.reserve(jnp.array([0, 0]))
    assert granted.tolist() == [True, True]
    rolled, granted = rolled.reserve(jnp.array([5, 0]))  # row 1 drops page 0; row 0 is then its only user
    assert granted.tolist() == [True, True] and int(rolled.block_table[1, 0]) == -1  # its own page 1 it keeps
    grown = rolled.append(jnp.full((2, 5, 1, d), 9.0), num_new=jnp.array([5, 0]))
    keys, _ = gather_pages(grown.pages[0], grown.block_table)
    assert grown.seqlens.tolist() == [35, 0] and np.asarray(keys[0, 30:35]).tolist() == [[[9.0, 9.0]]] * 5

    two = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=d, num_pages=4, on_demand=True,
                                  page_shards=2, dtype=jnp.float32)
    two = two.append(jnp.full((2, 5, 1, d), 3.0), num_new=jnp.array([5, 0]))
    foreign = dataclasses.replace(two, block_table=two.block_table.at[1, 0].set(two.block_table[0, 0]))
    written = foreign.write(jnp.full((2, 5, 1, d), 4.0))  # row 0's tokens 5-9 land; row 1's (slots 0-4) do not
    page = int(two.block_table[0, 0])
    np.testing.assert_array_equal(written.pages[0, page, :10, 0, 0], [3.0] * 5 + [4.0] * 5)

    odd = dataclasses.replace(cache, seqlens=jnp.array([100, 10**6], jnp.int32))
    assert odd.fork(jnp.array([-1, -1]))[0].seqlens.tolist() == [100, 10**6]
    wrapped, granted = cache.fork(np.array([-1, 2**32], np.int64))
    assert granted.tolist() == [True, False]
    np.testing.assert_array_equal(wrapped.block_table, cache.block_table)


@pytest.mark.parametrize("shards", [1, 2])
def test_every_row_reads_back_its_own_tokens_through_forks_rollbacks_and_releases(shards):
    """Random steps as a server takes them (reserve, write and advance the rows served; a model step that writes
    every row but advances only those served; rollbacks; releases; forks; a bare write), each token a distinct
    value: after every step each row reads back, below its length, the tokens it was given (or its source's,
    up to the fork), except those a rollback uncovered."""
    rng = np.random.default_rng(shards)
    batch, max_pages = 6, 5
    capacity = max_pages * PAGE_SIZE
    cache = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=capacity, head_dim=1, num_pages=12 * shards,
                                    on_demand=True, page_shards=shards, dtype=jnp.float32)
    step_jit = jax.jit(lambda cache, kv, count, advance_all: _server_step(cache, kv, count, advance_all))
    expected = [[] for _ in range(batch)]
    counter = 1.0
    for _ in range(60):
        lengths = np.asarray(cache.seqlens)
        op = rng.choice(["grow", "model", "rollback", "release", "fork", "write"], p=[0.3, 0.15, 0.15, 0.1, 0.2, 0.1])
        if op in ("grow", "model", "write"):
            width = int(rng.integers(1, 70)) if op != "model" else int(rng.integers(1, 4))
            values = counter + np.arange(batch * width, dtype=np.float32).reshape(batch, width)
            counter += batch * width
            kv = jnp.asarray(values[:, :, None, None])
            if op == "write":  # a bare write: it must not land in a page another row reads
                cache = jax.jit(lambda c, kv: c.write(kv))(cache, kv)
                served = np.zeros(batch, np.int32)
            else:
                count = rng.integers(0, width + 1, batch).astype(np.int32) if op == "grow" else np.full(batch, width)
                cache, served = step_jit(cache, kv, jnp.asarray(count, jnp.int32), op == "model")
                served = np.asarray(served)
            for row in range(batch):
                expected[row] += list(values[row, : min(int(served[row]), capacity - lengths[row])])
        elif op == "rollback":
            cache = advance_jit(cache, jnp.asarray(rng.integers(-90, 1, batch), jnp.int32))
            for row in range(batch):
                expected[row] = expected[row][: int(cache.seqlens[row])]
        elif op == "release":
            rows = rng.random(batch) < 0.25
            cache = release_jit(cache, jnp.asarray(rows))
            expected = [[] if rows[row] else expected[row] for row in range(batch)]
        else:
            sources = np.where(rng.random(batch) < 0.4, rng.integers(-1, batch, batch), -1).astype(np.int32)
            cache, granted = fork_jit(cache, jnp.asarray(sources))
            expected = [list(expected[sources[row]]) if granted[row] and sources[row] not in (-1, row)
                        else expected[row] for row in range(batch)]
        assert_pages_accounted(cache)
        keys, valid = gather_pages(cache.pages[0], cache.block_table)
        for row in range(batch):
            length = int(cache.seqlens[row])
            assert length == len(expected[row]) and np.asarray(valid[row, :length]).all()
            np.testing.assert_array_equal(np.asarray(keys[row, :length, 0, 0]), expected[row], err_msg=f"{op} {row}")


def _server_step(cache, kv, count, advance_all):
    """reserve count tokens a row, write them (a model step writes every row's s_q tokens whatever was served),
    and advance the rows served: -> (cache, tokens stored per row)."""
    cache, granted = cache.reserve(count)
    stored = jnp.where(granted, count, 0)
    cache = jax.lax.cond(advance_all, lambda c: c.write(kv), lambda c: c.write(kv, num_new=stored), cache)
    return cache.advance(stored), stored


def test_fork_copies_the_indexer_keys_and_refuses_what_it_cannot_do():
    """The partial page's indexer keys come with the copy. Refused: a source in another page shard, a source
    that is itself forked, and a fork the pool has no page for; their rows stay as they were."""
    cache = jfm.PagedKVCache.create(batch_size=4, max_seq_len=128, head_dim=8, num_pages=6, on_demand=True,
                                    page_shards=2, index_head_dim=4, dtype=jnp.float32, index_dtype=jnp.float32)
    kv = jnp.arange(4 * 70 * 8, dtype=jnp.float32).reshape(4, 70, 1, 8)
    keys = -jnp.arange(4 * 70 * 4, dtype=jnp.float32).reshape(4, 70, 4)
    cache = cache.append(kv, num_new=jnp.array([70, 0, 10, 0]), index_keys=keys)
    forked, granted = cache.fork(jnp.array([-1, 0, 0, 2]))  # row 2: source 0 is in the other shard
    assert granted.tolist() == [True, True, False, True]
    assert forked.seqlens.tolist() == [70, 70, 10, 10]
    index_keys, _ = forked.index_keys()
    np.testing.assert_array_equal(np.asarray(index_keys[1, :70]), np.asarray(keys[0]))
    np.testing.assert_array_equal(np.asarray(index_keys[3, :10]), np.asarray(keys[2, :10]))
    chained, granted = cache.fork(jnp.array([-1, 0, -1, -1]))
    chained, granted = chained.fork(jnp.array([1, 0, -1, -1]))  # row 0 copies row 1, row 1 copies row 0: refused
    assert granted.tolist() == [False, False, True, True]
    empty_pool = cache.reserve(jnp.array([58, 64, 0, 0]))[0]  # shard 0's three pages all taken
    assert int(empty_pool.free_count[0]) == 0
    refused, granted = empty_pool.fork(jnp.array([-1, 0, -1, -1]))
    assert granted.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(refused.block_table, empty_pool.block_table)
    with pytest.raises(TypeError, match="sources must be a \\(4,\\) integer array"):
        cache.fork(jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError, match="fork is for on-demand paging"):
        jfm.PagedKVCache.create(batch_size=4, max_seq_len=128, head_dim=8).fork(jnp.full((4,), -1))


def test_pages_go_out_in_order_and_come_back_last_in_first_out():
    cache = jfm.PagedKVCache.create(batch_size=3, max_seq_len=256, head_dim=8, num_pages=6, on_demand=True)
    np.testing.assert_array_equal(cache.block_table, -1)
    cache, granted = cache.reserve(jnp.array([65, 1, 128], jnp.int32))  # 2 + 1 + 2 pages
    np.testing.assert_array_equal(cache.block_table, [[0, 1, -1, -1], [2, -1, -1, -1], [3, 4, -1, -1]])
    assert granted.tolist() == [True, True, True] and int(cache.free_count[0]) == 1
    cache = cache.release(jnp.array([True, False, False]))
    assert int(cache.free_count[0]) == 3 and cache.free_pages[0, :3].tolist() == [5, 0, 1]
    cache, granted = cache.reserve(jnp.array([0, 64 * 3, 0], jnp.int32))  # row 1 needs columns 1 and 2
    np.testing.assert_array_equal(cache.block_table[1], [2, 1, 0, -1])
    # Nothing is left but page 5; row 0 needs two pages and is refused, so row 2 (needing one) is too.
    cache, granted = cache.reserve(jnp.array([100, 0, 129], jnp.int32))
    assert granted.tolist() == [False, True, False] and int(cache.free_count[0]) == 1


def test_reserve_replaces_another_shards_page():
    """A row naming a page of another shard (a hand-edited table) gets one of its own there: the write would go
    to a page another row owns on one device, and be dropped on a mesh."""
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=8, num_pages=4, on_demand=True,
                                    page_shards=2)
    cache = dataclasses.replace(cache, block_table=jnp.array([[2, -1], [-1, -1]], jnp.int32))
    cache, granted = cache.reserve(jnp.array([1, 1], jnp.int32))
    assert granted.tolist() == [True, True] and cache.block_table.tolist() == [[0, -1], [2, -1]]


def test_release_never_pushes_a_page_twice():
    """A table edited by hand: a page named twice, a page already free, another shard's page and ids outside the
    pool. Each free page is pushed once; the others are not pushed."""
    cache = jfm.PagedKVCache.create(batch_size=4, max_seq_len=256, head_dim=8, num_pages=8, on_demand=True,
                                    page_shards=2)
    cache, _ = cache.reserve(jnp.array([64, 64, 64, 64], jnp.int32))  # rows 0,1: pages 0,1; rows 2,3: pages 4,5
    table = cache.block_table.at[0].set(jnp.array([0, 0, 3, 6])).at[1].set(jnp.array([1, -7, 2**30, 0]))
    cache = dataclasses.replace(cache, block_table=table)
    released = cache.release(jnp.array([True, True, False, False]))
    # Shard 0 held pages 2, 3 free and 0, 1 in use: 0 and 1 come back once each; 3 (already free) and 6 (shard 1's)
    # are not pushed.
    assert released.free_count.tolist() == [4, 2]
    assert released.free_pages[0].tolist()[:4] == [3, 2, 0, 1]
    np.testing.assert_array_equal(released.block_table[:2], -1)
    assert released.seqlens.tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(released.block_table[2:], cache.block_table[2:])


def test_append_serves_what_the_pool_holds_and_reads_back_like_a_static_cache():
    """Rows that take pages in turns get interleaved page ids; the decode reads exactly what a static cache with
    the same tokens reads. A row the pool cannot serve stores nothing and keeps its length."""
    rng = np.random.default_rng(0)
    batch, h_q, d, dv = 3, 4, 576, 512
    static = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=200, head_dim=d)
    paged = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=200, head_dim=d, num_pages=9, on_demand=True)
    for step in range(4):  # 4 appends of 40 tokens: 160 a row, 3 pages a row
        kv = jnp.asarray(rng.standard_normal((batch, 40, 1, d)), jnp.bfloat16)
        static, paged = static.append(kv), paged.append(kv)
    table = np.asarray(paged.block_table)
    assert sorted(table[:, :3].ravel().tolist()) == list(range(9))
    assert not np.array_equal(table[:, :3], np.arange(9).reshape(3, 3))  # the rows' pages interleave
    assert_same_decode(paged, static, jnp.asarray(rng.standard_normal((batch, 2, h_q, d)), jnp.bfloat16), dv)

    full = paged.append(jnp.ones((batch, 70, 1, d), jnp.bfloat16), num_new=jnp.array([10, 70, 0]))
    # Row 0 fits in its third page; row 1 needs two more pages and the pool has none.
    assert full.seqlens.tolist() == [170, 160, 160]
    np.testing.assert_array_equal(full.block_table, paged.block_table)


@pytest.mark.gpu
@pytest.mark.parametrize("h_q", [16, 128])  # the narrow kernel and the seesaw
def test_kernels_read_on_demand_pages_as_they_read_static_ones(h_q):
    """Eight rows of ragged lengths grown in turns from one pool: their pages interleave, and the kernels' out
    and lse are bit for bit those of the static cache holding the same tokens."""
    assert jfm.kernels_available(), jfm.why_kernels_unavailable()
    rng = np.random.default_rng(1)
    batch, d, dv, max_len = 8, 576, 512, 1000
    lengths = np.array([1000, 1, 0, 640, 333, 64, 65, 900])
    static = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=max_len)
    paged = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=max_len, num_pages=batch * 16, on_demand=True)
    for chunk in range(10):  # 100 tokens a round, each row stopping at its length
        kv = jnp.asarray(rng.standard_normal((batch, 100, 1, d)), jnp.bfloat16)
        counts = jnp.asarray(np.clip(lengths - 100 * chunk, 0, 100), jnp.int32)
        static, paged = static.append(kv, num_new=counts), paged.append(kv, num_new=counts)
    np.testing.assert_array_equal(paged.seqlens, lengths)
    assert not np.array_equal(paged.block_table[:, :2], static.block_table[:, :2])
    assert_same_decode(paged, static, jnp.asarray(rng.standard_normal((batch, 2, h_q, d)), jnp.bfloat16), dv)


@pytest.mark.gpu
@pytest.mark.parametrize("h_q", [16, 128])  # the narrow kernel and the seesaw
def test_kernels_read_forked_rows_as_they_read_static_ones(h_q):
    """A 700-token prompt forked into three more rows, each then given 150 tokens of its own: the kernels read
    the shared pages and each row's own pages bit for bit as they read a static cache holding the same tokens."""
    assert jfm.kernels_available(), jfm.why_kernels_unavailable()
    rng = np.random.default_rng(2)
    batch, d, dv = 4, 576, 512
    prompt = jnp.asarray(rng.standard_normal((batch, 700, 1, d)), jnp.bfloat16)
    prompt = jnp.broadcast_to(prompt[:1], prompt.shape)
    own = jnp.asarray(rng.standard_normal((batch, 150, 1, d)), jnp.bfloat16)
    static = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=1000).append(prompt).append(own)
    paged = jfm.PagedKVCache.create(batch_size=batch, max_seq_len=1000, num_pages=40, on_demand=True)
    paged = paged.append(prompt, num_new=jnp.array([700, 0, 0, 0]))
    paged, granted = paged.fork(jnp.array([-1, 0, 0, 0]))
    assert granted.tolist() == [True] * 4
    paged = paged.append(own)
    np.testing.assert_array_equal(paged.seqlens, static.seqlens)
    assert (np.asarray(paged.block_table)[:, :10] == np.asarray(paged.block_table)[0, :10]).all()  # shared
    assert_same_decode(paged, static, jnp.asarray(rng.standard_normal((batch, 2, h_q, d)), jnp.bfloat16), dv)


def test_reserve_replaces_ids_outside_the_pool():
    """An entry no page backs (an id past the pool, or negative other than -1) counts as missing: the decode would
    skip it and `write` drop its tokens."""
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=8, num_pages=4, on_demand=True)
    cache = dataclasses.replace(cache, block_table=jnp.array([[4, -1], [-9, 2**30]], jnp.int32))
    cache, granted = cache.reserve(jnp.array([10, 70], jnp.int32))
    assert granted.tolist() == [True, True] and cache.block_table.tolist() == [[0, -1], [1, 2]]


def test_hostile_lengths_and_counts_are_clipped_as_documented():
    """Lengths are clipped to [0, capacity] and counts to [0, capacity - length], whatever their type: a NumPy
    int64 or a Python int past int32 must not wrap into a small count."""
    cache = jfm.PagedKVCache.create(batch_size=3, max_seq_len=192, head_dim=8, num_pages=9, on_demand=True)
    cache = dataclasses.replace(cache, seqlens=jnp.array([-5, 2**31 - 1, 100], jnp.int32))
    reserved, granted = cache.reserve(np.array([2**32 + 64, 0, -(2**32) + 1]))
    assert granted.tolist() == [True, True, True]
    # Row 0 from 0 to the capacity (3 pages), row 1 holds the capacity already (3), row 2 its 100 tokens (2).
    assert reserved.block_table.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, -1]]
    small, _ = cache.reserve(jnp.array([3, 0, 0], jnp.int32))  # written from position 0, where `write` starts
    assert small.block_table[0].tolist() == [0, -1, -1]
    for count in (2**40, np.int64(2**40), [2**40, 0, 0], np.array([2**64 - 1, 0, 0], np.uint64)):
        again, _ = cache.reserve(count)
        assert again.block_table[0].tolist() == [0, 1, 2]
    assert cache.advance(np.array([2**32 + 1, 0, 0])).seqlens.tolist() == [192, 192, 100]
    with pytest.raises(ValueError, match=r"kv must have shape \(3, s_new, 1, 8\), got shape \(8,\)"):
        cache.append(jnp.ones((8,)))


def test_lengths_past_the_capacity_take_no_more_than_the_table():
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=8, num_pages=4, on_demand=True)
    cache, granted = cache.reserve(jnp.array([2**31 - 1, -5], jnp.int32))
    assert granted.tolist() == [True, True]
    np.testing.assert_array_equal(cache.block_table, [[0, 1], [-1, -1]])
    cache = cache.advance(jnp.array([2**30, 0], jnp.int32))
    cache, granted = cache.reserve(jnp.array([10, 128], jnp.int32))
    assert granted.tolist() == [True, True] and cache.block_table.tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(on_demand=True, block_table=np.zeros((2, 2), np.int32), num_pages=4), ValueError, "no block_table"),
        (dict(page_shards=2), ValueError, "pass on_demand=True"),
        (dict(on_demand=True, num_pages=5, page_shards=2), ValueError, "divide evenly into page_shards=2"),
        (dict(on_demand=True, num_pages=0), ValueError, "num_pages must be an int"),
        (dict(on_demand=True, num_pages=2**25), ValueError, "num_pages must be an int"),
        (dict(on_demand=True, page_shards=0), ValueError, "page_shards must be a positive int"),
        (dict(on_demand=True, page_shards=True), ValueError, "page_shards must be a positive int"),
        (dict(on_demand=True, num_pages=True), ValueError, "num_pages must be an int"),
        (dict(max_seq_len=2**30 + 1), ValueError, r"max_seq_len must be at most 1073741824 tokens"),
        (dict(block_table=np.zeros((2, 2**24 + 1), np.int32), num_pages=1), ValueError,
         r"block_table has 16777217 columns, more than the decode's limit of 16777216"),
    ],
)
def test_bad_on_demand_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        jfm.PagedKVCache.create(**{"batch_size": 2, "max_seq_len": 128, "head_dim": 8, **kwargs})


def test_reserve_and_release_refuse_what_they_cannot_use():
    static = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=8)
    with pytest.raises(ValueError, match="reserve is for on-demand paging: create the cache with on_demand=True"):
        static.reserve(1)
    with pytest.raises(ValueError, match="release is for on-demand paging"):
        static.release(jnp.array([True, False]))
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=8, on_demand=True)
    with pytest.raises(TypeError, match=r"rows must be a \(2,\) bool mask, got shape \(2,\) and dtype int32"):
        cache.release(jnp.array([1, 0], jnp.int32))
    with pytest.raises(TypeError, match=r"num_new must be an int or a \(2,\) integer array"):
        cache.reserve(jnp.ones((3,), jnp.int32))
    broken = dataclasses.replace(cache, free_count=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"free_pages must be int32 \(page_shards, num_pages // page_shards\)"):
        broken.reserve(1)


def test_a_static_cache_keeps_no_free_stack():
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=128, head_dim=8)
    assert not cache.is_on_demand and cache.free_pages is None and cache.free_count is None
    assert len(jax.tree_util.tree_leaves(cache)) == 3  # pages, block_table, seqlens


def test_continuous_batching_gives_each_request_what_it_gets_alone():
    """Five requests through two rows and a pool of five pages (two rows at their longest would need eight):
    each request is prefilled into a row as one finishes and is released, the idle row sits out decode steps
    (active=), and pages freed by one request are taken by the next. Each request's greedy tokens and logits are
    those of generating it alone with a static cache."""
    from jax_flashmla.model import DecoderConfig, build_model, generate

    config = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                           q_lora_rank=16, qk_nope_head_dim=16, v_head_dim=16)
    model = build_model(config, seed=3)
    rng = np.random.default_rng(4)
    requests = [(rng.integers(0, config.vocab_size, n).tolist(), steps)
                for n, steps in [(60, 9), (5, 3), (70, 4), (1, 6), (30, 2)]]
    batch, width = 2, 80
    cache = model.new_cache(batch, 256, num_pages=5)
    prefill, decode = jax.jit(model.prefill), jax.jit(model.decode)
    row_request, outputs, logits_of = [None] * batch, {}, {}
    pages_of = {i: set() for i in range(len(requests))}
    pending = list(range(len(requests)))
    while pending or any(r is not None for r in row_request):
        for row in range(batch):  # admit into free rows, one prefill a request
            if row_request[row] is None and pending:
                index = pending.pop(0)
                prompt, _ = requests[index]
                tokens = np.zeros((batch, width), np.int32)
                tokens[row, : len(prompt)] = prompt
                lengths = np.zeros(batch, np.int32)
                lengths[row] = len(prompt)
                logits, cache = prefill(jnp.asarray(tokens), jnp.asarray(lengths), cache)
                assert int(cache.seqlens[row]) == len(prompt)  # the pool served it
                row_request[row], outputs[index], logits_of[index] = index, [int(logits[row].argmax())], [logits[row]]
        live = np.array([r is not None and len(outputs[r]) < requests[r][1] for r in row_request])
        if live.any():
            last = np.array([outputs[r][-1] if r is not None else 0 for r in row_request], np.int32)
            before = np.asarray(cache.seqlens)
            logits, cache = decode(jnp.asarray(last)[:, None], cache, active=jnp.asarray(live))
            np.testing.assert_array_equal(cache.seqlens, before + live)  # served, and idle rows stayed
            for row in np.flatnonzero(live):
                outputs[row_request[row]].append(int(logits[row, 0].argmax()))
                logits_of[row_request[row]].append(logits[row, 0])
        done = np.array([r is not None and len(outputs[r]) == requests[r][1] for r in row_request])
        for row in np.flatnonzero(done):
            table = np.asarray(cache.block_table[row])
            pages_of[row_request[row]] |= set(table[table >= 0].tolist())
            row_request[row] = None
        if done.any():
            cache = cache.release(jnp.asarray(done))

    assert int(cache.free_count[0]) == 5 and np.all(np.asarray(cache.block_table) == -1)
    assert pages_of[0] & pages_of[2] or pages_of[0] & pages_of[3] or pages_of[1] & pages_of[2]  # pages reused
    for index, (prompt, steps) in enumerate(requests):
        alone = generate(model, [prompt], steps)
        assert outputs[index] == alone.tokens[0].tolist(), index
        np.testing.assert_allclose(np.stack(logits_of[index]), alone.logits[0], rtol=0,
                                   atol=1e-5 * np.abs(alone.logits).max())
