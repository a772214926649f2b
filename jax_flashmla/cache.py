"""A paged latent-KV cache as a JAX pytree.

Layout: one page pool per layer, stacked on a leading axis, (num_layers, num_pages, 64, h_kv, d); one block
table (b, max_pages_per_seq) int32 and one length vector (b,) int32 shared by all layers.

Page hand-out, two ways:
- Static (the default): `create` gives sequence i the pages i*max_pages .. (i+1)*max_pages - 1, a reservation
  of max_seq_len tokens per sequence. Any other fixed assignment (a host-side allocator, pages shared between
  sequences' common prefixes) is just another block_table: pass it to `create` or replace the field; the kernels
  and `write` only ever follow the table. A page several rows share (a common prefix) must not be written
  through any of them: two rows writing one slot is a race, and one row's write changes what the others read.
  Copy-on-write is the caller's (give the writing row a page of its own first).
- On demand (`create(on_demand=True, num_pages=...)`): the pool may be smaller than batch * max_pages. Block
  table entries start at -1 (no page) and the cache keeps a stack of free page ids; `reserve` hands each row the
  pages its next tokens need and `release` returns a finished row's pages (continuous batching). Both are a few
  fused array ops (paging.py), so they sit inside a jitted decode step. A batch split over a mesh keeps one free
  stack per page shard (`page_shards`), so that each row's pages stay in its own shard (sharding.py).
  `fork` makes rows copies of others that share their full pages (a common prompt, parallel sampling): the
  table is the reference count, a page is freed when no row names it, and no write lands in a page another row
  names (`reserve` gives the writer its own page first).

FP8 (DeepSeek-V3.2's layout, fp8_cache.py): `create(dtype=jnp.float8_e4m3fn)` keeps each 576-dim token as 656
packed bytes, (num_layers, num_pages, 64, h_kv, 656); `write` packs what it stores. Sparse attention reads such a
pool (flash_mla_with_kvcache with indices= and is_fp8_kvcache=True; `sparse_indices` makes the indices).

Writes go through scatters on the device. Inside `jax.jit(..., donate_argnums=...)` with the cache donated,
XLA updates the pool in place: a decode step moves only the new tokens' bytes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import validation
from .constants import MAX_PAGES_PER_SEQ, PAGE_SIZE
from .fp8_cache import FP8_TOKEN_BYTES, HEAD_DIM as FP8_HEAD_DIM, is_packed_fp8, quantize_kv_cache
from .paging import fork_in_shard, release_in_shard, reserve_in_shard, writable
from .reference import gather_pages
from .sharding import copy_pages, rows_placed_like, scatter_tokens


def ints_as_int32(values, low: int, high: int):
    """Integers of any width as int32 without wrapping. Those that could wrap (unsigned of 4 bytes or more, signed
    of 8) are clipped into [low, high] first, both within int32; narrower ones convert exactly (jnp.minimum of a
    uint8 array and 2**30 would itself wrap the bound to 0)."""
    if values.dtype.itemsize < 4:
        return values.astype(jnp.int32)
    if jnp.issubdtype(values.dtype, jnp.unsignedinteger):
        return jnp.minimum(values, high).astype(jnp.int32)
    if values.dtype.itemsize > 4:
        return jnp.clip(values, low, high).astype(jnp.int32)
    return values.astype(jnp.int32)


def integers_within(values, low: int, high: int):
    """values (a Python or NumPy integer, a list, an array) as an array; host integers clipped into [low, high]
    (int32 bounds) before jnp.asarray could wrap them into int32 (x64 is off), device integers converted by
    ints_as_int32 after the caller checks their shape. Anything else comes back as jnp.asarray gives it, for the
    caller's type check."""
    if isinstance(values, int) and not isinstance(values, bool):
        return jnp.asarray(np.int32(min(max(values, low), high)))
    if isinstance(values, (np.ndarray, np.integer, list, tuple)) and np.issubdtype(np.asarray(values).dtype,
                                                                                    np.integer):
        return jnp.asarray(np.clip(np.asarray(values), low, high).astype(np.int32))
    return jnp.asarray(values)


def indices_in_kvcache(block_table, positions, num_pages: int):
    """int32 token positions (b, ..., topk) of each sequence -> the indices sparse attention takes (FlashMLA's
    indices_in_kvcache): page * 64 + slot through block_table (b, max_pages). -1 where the position lies outside
    [0, 64 * max_pages) or its page id outside [0, num_pages), so that no index can wrap around in int32."""
    batch, max_pages = block_table.shape
    ok = (positions >= 0) & (positions < max_pages * PAGE_SIZE)
    positions = jnp.where(ok, positions, 0)
    page = jnp.take_along_axis(block_table, positions.reshape(batch, -1) // PAGE_SIZE, axis=1).reshape(positions.shape)
    ok &= (page >= 0) & (page < min(num_pages, 2**31 // PAGE_SIZE))  # page * 64 + slot fits int32
    return jnp.where(ok, page * PAGE_SIZE + positions % PAGE_SIZE, -1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    pages: jax.Array  # (num_layers, num_pages, 64, h_kv, d), or (..., 656) packed FP8 tokens
    block_table: jax.Array  # (b, max_pages_per_seq) int32
    seqlens: jax.Array  # (b,) int32, tokens stored per sequence
    # DeepSeek-V3.2's lightning-indexer keys, one per token, in the same pages and slots as the latent entries:
    # (num_layers, num_pages, 64, 1, index_head_dim), or None for a cache without them.
    index_pages: jax.Array | None = None
    # On-demand paging only (create(on_demand=True)), else None: each page shard's free page ids as a stack (the
    # first free_count[s] entries of free_pages[s] are free; the top, popped first, is the last of them), in
    # global ids, shard s owning pages [s * n, (s + 1) * n) with n = num_pages // page_shards.
    free_pages: jax.Array | None = None  # (page_shards, n) int32
    free_count: jax.Array | None = None  # (page_shards,) int32

    @classmethod
    def create(cls, *, batch_size: int, max_seq_len: int, num_layers: int = 1, num_heads_k: int = 1,
               head_dim: int = 576, dtype=jnp.bfloat16, block_table=None, num_pages: int | None = None,
               index_head_dim: int | None = None, index_dtype=None, on_demand: bool = False,
               page_shards: int = 1):
        """An empty cache with room for max_seq_len tokens per sequence. dtype=jnp.float8_e4m3fn keeps the tokens
        packed in DeepSeek-V3.2's FP8 layout (head_dim must then be 576). index_head_dim: also keep a lightning-
        indexer key per token (index_pages), in index_dtype (default: dtype, or bfloat16 beside an FP8 pool).

        on_demand: no row owns a page until `reserve` hands it one, from a pool of num_pages (default: enough for
        every row's max_seq_len); page_shards: one free stack per shard of the batch and the pool, as many as the
        mesh splits the batch into (`sharding.shard_cache` checks)."""
        if batch_size < 1 or max_seq_len < 1 or num_layers < 1 or num_heads_k < 1:
            raise ValueError("batch_size, max_seq_len, num_layers and num_heads_k must be positive, got "
                             f"{batch_size}, {max_seq_len}, {num_layers}, {num_heads_k}")
        if not isinstance(page_shards, (int, np.integer)) or isinstance(page_shards, bool) or page_shards < 1:
            raise ValueError(f"page_shards must be a positive int, got {page_shards!r}")
        if page_shards != 1 and not on_demand:
            raise ValueError(f"page_shards={page_shards} is for on-demand paging: pass on_demand=True too")
        if on_demand and block_table is not None:
            raise ValueError("on_demand=True fills the block_table itself (reserve); pass no block_table")
        if index_head_dim is not None and (not isinstance(index_head_dim, int) or index_head_dim < 1):
            raise ValueError(f"index_head_dim must be None or a positive int, got {index_head_dim!r}")
        width = head_dim
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating-point type (bfloat16, float16, float32, or float8_e4m3fn for "
                            f"packed FP8 tokens), got {np.dtype(dtype).name}")
        fp8 = np.dtype(dtype) == np.dtype(jnp.float8_e4m3fn)
        if fp8:
            if head_dim != FP8_HEAD_DIM:
                raise ValueError(f"an FP8 cache packs {FP8_HEAD_DIM}-dim tokens (512 latent + 64 rope dims), got "
                                 f"head_dim={head_dim}")
            width = FP8_TOKEN_BYTES
        max_pages = -(-max_seq_len // PAGE_SIZE)
        if max_pages > MAX_PAGES_PER_SEQ:  # the decode's limit, and it keeps every position within int32
            raise ValueError(f"max_seq_len must be at most {MAX_PAGES_PER_SEQ * PAGE_SIZE} tokens ({MAX_PAGES_PER_SEQ} "
                             f"pages of {PAGE_SIZE}), got {max_seq_len}")
        free_pages = free_count = None
        if on_demand:
            num_pages = batch_size * max_pages if num_pages is None else num_pages
            if (not isinstance(num_pages, (int, np.integer)) or isinstance(num_pages, bool) or num_pages < 1
                    or num_pages >= 2**31 // PAGE_SIZE):
                raise ValueError(f"num_pages must be an int in [1, {2**31 // PAGE_SIZE}), got {num_pages!r}")
            if batch_size % page_shards or num_pages % page_shards:
                raise ValueError(f"batch_size ({batch_size}) and num_pages ({num_pages}) must divide evenly into "
                                 f"page_shards={page_shards}")
            if batch_size * max_pages >= 2**31:  # reserve's running sums of pages count up to that
                raise ValueError(f"on-demand paging counts table entries in int32: batch_size * pages per row = "
                                 f"{batch_size} * {max_pages} must stay below 2**31")
            per_shard = num_pages // page_shards
            block_table = jnp.full((batch_size, max_pages), -1, jnp.int32)
            # Descending, so that the top of each stack is the shard's lowest id: pages go out in ascending order.
            free_pages = (jnp.arange(page_shards, dtype=jnp.int32)[:, None] * per_shard
                          + jnp.arange(per_shard - 1, -1, -1, dtype=jnp.int32)[None, :])
            free_count = jnp.full((page_shards,), per_shard, jnp.int32)
        elif block_table is None:
            block_table = jnp.arange(batch_size * max_pages, dtype=jnp.int32).reshape(batch_size, max_pages)
            num_pages = batch_size * max_pages if num_pages is None else num_pages
        else:
            block_table = jnp.asarray(block_table)
            if block_table.dtype != jnp.int32 or block_table.ndim != 2 or block_table.shape[0] != batch_size:
                raise ValueError(f"block_table must be int32 of shape ({batch_size}, max_pages), got shape "
                                 f"{tuple(block_table.shape)} and dtype {np.dtype(block_table.dtype).name}")
            if num_pages is None:
                raise ValueError("num_pages is required with a custom block_table")
            if block_table.shape[1] > MAX_PAGES_PER_SEQ:
                raise ValueError(f"block_table has {block_table.shape[1]} columns, more than the decode's limit of "
                                 f"{MAX_PAGES_PER_SEQ} pages a row")
            if block_table.shape[1] < max_pages:
                raise ValueError(f"block_table has {block_table.shape[1]} columns, fewer than the {max_pages} pages "
                                 f"max_seq_len={max_seq_len} needs")
        pages = jnp.zeros((num_layers, num_pages, PAGE_SIZE, num_heads_k, width), dtype)
        index_pages = None
        if index_dtype is not None and index_head_dim is None:
            raise ValueError("index_dtype is the dtype of the indexer keys: pass index_head_dim= too")
        if index_head_dim is not None:
            if index_dtype is None:
                index_dtype = jnp.bfloat16 if fp8 else dtype
            if not jnp.issubdtype(index_dtype, jnp.floating) or np.dtype(index_dtype).itemsize < 2:
                raise TypeError(f"index_dtype must be a 16- or 32-bit float type, got {np.dtype(index_dtype).name}")
            index_pages = jnp.zeros((num_layers, num_pages, PAGE_SIZE, 1, index_head_dim), index_dtype)
        return cls(pages=pages, block_table=block_table, seqlens=jnp.zeros((batch_size,), jnp.int32),
                   index_pages=index_pages, free_pages=free_pages, free_count=free_count)

    @property
    def capacity(self) -> int:
        """Tokens each sequence can hold: 64 * max_pages_per_seq."""
        return self.block_table.shape[1] * PAGE_SIZE

    @property
    def num_layers(self) -> int:
        return self.pages.shape[0]

    @property
    def is_fp8(self) -> bool:
        """Are the tokens packed in the FP8 layout (pass is_fp8_kvcache=self.is_fp8 to the decode)."""
        return is_packed_fp8(self.pages)

    @property
    def is_on_demand(self) -> bool:
        """Does the cache hand out pages as rows grow (create(on_demand=True); reserve, release)."""
        return self.free_pages is not None

    @property
    def head_dim(self) -> int:
        """Dims of a token as written and read: 576 for an FP8 cache, else the pool's last axis."""
        return FP8_HEAD_DIM if self.is_fp8 else self.pages.shape[-1]

    def layer_pages(self, layer) -> jax.Array:
        """The page pool of one layer, (num_pages, 64, h_kv, d), FlashMLA's k_cache. flash_mla_with_kvcache
        also takes `pages` with layer=, which the kernels read in place whatever XLA does with a slice."""
        return self.pages[layer]

    def sparse_indices(self, positions) -> jax.Array:
        """Token positions of each sequence, (b, ..., topk) integers such as an indexer's top-k picks, -> the
        indices sparse attention takes (FlashMLA's indices_in_kvcache): page * 64 + slot into one layer's pool,
        through block_table. -1 where the position lies outside [0, capacity) or its page id outside
        [0, num_pages), so that no index can wrap around in int32. Positions past seqlens are not masked: the
        slots they name may not have been written."""
        positions = jnp.asarray(positions)
        batch = self.block_table.shape[0]
        if not jnp.issubdtype(positions.dtype, jnp.integer) or positions.ndim < 2 or positions.shape[0] != batch:
            raise TypeError(f"positions must be integers of shape ({batch}, ..., topk), got shape "
                            f"{tuple(positions.shape)} and dtype {np.dtype(positions.dtype).name}")
        return indices_in_kvcache(self.block_table, ints_as_int32(positions, -1, self.capacity), self.pages.shape[1])

    def write(self, kv, *, layer=0, num_new=None) -> "PagedKVCache":
        """Store kv (b, s_new, h_kv, d) at positions seqlens[i] + j of `layer`'s pool (seqlens clipped to
        [0, capacity], as the decode clips them); seqlens unchanged. An FP8 cache packs kv (d = 576) first.

        layer: a Python int in [0, num_layers), or a traced integer scalar, clamped into that range as the decode
        clamps it (so a write and a read at the same index meet).
        num_new: an int or a (b,) integer array, optional: write only the first num_new[i] tokens of row i
        (ragged prefill); counts outside [0, s_new] are clipped to it.
        Tokens that fall past the capacity or on an invalid page id are dropped, never written elsewhere; so are,
        on an on-demand cache, those on a page of another shard or one another row names (`fork`: call `reserve`
        first).
        """
        kv = self._check_entries(kv)
        validation.check_layer(self.pages, layer, name="pages")
        page, slot = self._new_token_slots(kv.shape[1], num_new)
        # The scatter partitions over a mesh like the decode (jax_flashmla/sharding.py).
        if self.is_fp8:
            kv = jax.lax.bitcast_convert_type(quantize_kv_cache(kv), self.pages.dtype)  # float8 or uint8 storage
        pages = scatter_tokens(self.pages, kv.astype(self.pages.dtype), page, slot,
                               validation.clamp_layer(layer, self.num_layers))
        return dataclasses.replace(self, pages=pages)

    def _check_entries(self, kv) -> jax.Array:
        """kv as write takes it, (b, s_new, h_kv, head_dim) floats, or an error that says what was expected."""
        kv = jnp.asarray(kv)
        h_kv, head_dim = self.pages.shape[3], self.head_dim
        batch = self.block_table.shape[0]
        if kv.ndim != 4 or kv.shape[0] != batch or kv.shape[2:] != (h_kv, head_dim):
            raise ValueError(f"kv must have shape ({batch}, s_new, {h_kv}, {head_dim}), got shape {tuple(kv.shape)}")
        if not jnp.issubdtype(kv.dtype, jnp.floating):
            raise TypeError(f"kv must be a floating-point array (it is cast to the pool's "
                            f"{np.dtype(self.pages.dtype).name}), got dtype {np.dtype(kv.dtype).name}")
        return kv

    def write_index_keys(self, keys, *, layer=0, num_new=None) -> "PagedKVCache":
        """Store lightning-indexer keys (b, s_new, index_head_dim) where `write` stores the same tokens' latent
        entries (same layer, num_new and drops); seqlens unchanged."""
        self.check_index_pages()
        keys = jnp.asarray(keys)
        batch, index_head_dim = self.block_table.shape[0], self.index_pages.shape[-1]
        if keys.ndim != 3 or keys.shape[0] != batch or keys.shape[2] != index_head_dim:
            raise ValueError(f"keys must have shape ({batch}, s_new, {index_head_dim}), got shape {tuple(keys.shape)}")
        if not jnp.issubdtype(keys.dtype, jnp.floating):
            raise TypeError(f"keys must be a floating-point array, got dtype {np.dtype(keys.dtype).name}")
        validation.check_layer(self.pages, layer, name="pages")
        page, slot = self._new_token_slots(keys.shape[1], num_new)
        index_pages = scatter_tokens(self.index_pages, keys[:, :, None, :].astype(self.index_pages.dtype), page, slot,
                                     validation.clamp_layer(layer, self.num_layers))
        return dataclasses.replace(self, index_pages=index_pages)

    def index_keys(self, layer=0) -> tuple[jax.Array, jax.Array]:
        """Every position's indexer key of one layer through block_table: (b, capacity, index_head_dim), and
        (b, capacity) bool, False where the position's page id is invalid (its key reads as zeros). Positions past
        seqlens are not masked: their slots may not have been written."""
        self.check_index_pages()
        validation.check_layer(self.pages, layer, name="pages")
        keys, on_valid_page = gather_pages(self.index_pages[validation.clamp_layer(layer, self.num_layers)],
                                           self.block_table)  # (b, capacity, 1, d)
        return jnp.where(on_valid_page[:, :, None], keys[:, :, 0], jnp.zeros((), keys.dtype)), on_valid_page

    def check_index_pages(self) -> None:
        """index_pages exists and matches pages token for token: the same layers, pages and slots, one key each."""
        if self.index_pages is None:
            raise ValueError("this cache keeps no indexer keys: create it with index_head_dim=")
        want = (*self.pages.shape[:3], 1)
        if self.index_pages.ndim != 5 or self.index_pages.shape[:4] != want:
            raise ValueError(f"index_pages must have shape {want + ('index_head_dim',)} to match pages "
                             f"{tuple(self.pages.shape)}, got {tuple(self.index_pages.shape)}")

    def _new_token_slots(self, s_new: int, num_new) -> tuple[jax.Array, jax.Array]:
        """(page, slot) (b, s_new) int32 where the next s_new tokens of each row go; dropped tokens (past the
        capacity or num_new, or on an invalid page id) get page num_pages, which the scatter's mode="drop" discards."""
        num_pages = self.pages.shape[1]
        # From the length the decode sees (clipped to [0, capacity]), so that append's advance matches what it stored.
        start = jnp.clip(self.seqlens, 0, self.capacity)
        positions = start[:, None] + jnp.arange(s_new, dtype=jnp.int32)[None, :]  # (b, s_new)
        keep = (positions >= 0) & (positions < self.capacity)
        if num_new is not None:
            keep &= jnp.arange(s_new)[None, :] < self._token_counts(num_new)[:, None]
        page_slot = jnp.clip(positions // PAGE_SIZE, 0, self.block_table.shape[1] - 1)
        page = jnp.take_along_axis(self.block_table, page_slot, axis=1)
        keep &= (page >= 0) & (page < num_pages)
        if self.is_on_demand:  # only into the row's shard's pages, and none another row names (fork: reserve
            # gives the writer its own first)
            per_shard = self.free_pages.shape[1]
            ok = jax.vmap(lambda table: writable(table, per_shard), axis_name="page_shard")(
                self._by_shard(self.block_table)).reshape(self.block_table.shape)
            keep &= jnp.take_along_axis(ok, page_slot, axis=1)
        return jnp.where(keep, page, num_pages), positions % PAGE_SIZE

    def advance(self, num_new) -> "PagedKVCache":
        """seqlens += num_new (an int, or a (b,) integer array), kept within [0, capacity]: a negative count
        rolls a row back (rejected draft tokens, say), never below 0."""
        # The step is clipped against the length itself, so the int32 sum stays in [0, capacity] and cannot wrap
        # (capacity may be 2**30, and 2**30 + 2**30 would).
        base = jnp.clip(self.seqlens, 0, self.capacity)
        step = jnp.clip(self._token_counts(num_new), -base, self.capacity - base)
        return dataclasses.replace(self, seqlens=(base + step).astype(jnp.int32))

    def reserve(self, num_new) -> tuple["PagedKVCache", jax.Array]:
        """On-demand paging: give each row the pages its next num_new tokens need (an int or a (b,) integer
        array; counts are clipped to [0, capacity - length]), popped from its shard's free stack.

        Returns (cache, granted), granted a (b,) bool: the row now has a page for each of its first
        length + num_new positions. Rows are served in order within a shard, all of a row's pages or none: once a
        row cannot be served, no later row of its shard that needs a page is (a server preempts such rows). A row
        that needs no page is always granted. A row not granted lacks a page for some of those positions, and
        `write` drops the tokens that land there (those that fit its last page are stored); `append` and the
        model's steps store nothing for it and leave its length. A table entry that names no page of the row's
        shard (-1, an id outside the pool or another shard's page) counts as missing and is replaced.

        Shared pages (`fork`): a page another entry names is dropped from a row's columns past its tokens, and
        replaced by a page of the row's own in a column its new tokens go to (it is freed once no row names
        it). Where that column also holds the row's earlier tokens (a shared partial page, which only a rollback
        into shared pages or a hand-made table gives), the row is refused and takes nothing; it blocks no later
        row. Such a row can grow again once the other rows sharing that page have left it.
        """
        self._check_on_demand("reserve")
        start = jnp.clip(self.seqlens, 0, self.capacity)
        end = start + jnp.clip(self._token_counts(num_new), 0, self.capacity - start)
        batch, max_pages = self.block_table.shape
        free_pages, table, free_count, granted = jax.vmap(reserve_in_shard, axis_name="page_shard")(
            self.free_pages, self.free_count, self._by_shard(self.block_table),
            self._by_shard(rows_placed_like(start, self.block_table)),
            self._by_shard(rows_placed_like(end, self.block_table)))
        return (dataclasses.replace(self, block_table=table.reshape(batch, max_pages), free_pages=free_pages,
                                    free_count=free_count), granted.reshape(batch))

    def release(self, rows) -> "PagedKVCache":
        """On-demand paging: rows (a (b,) bool mask) are done. Their pages go back to their shard's free stack,
        their block-table entries become -1 and their lengths 0, so the rows can take new sequences.

        A page a released row names is freed unless a row that stays names it too (a prefix shared by `fork`).
        A page id outside the row's shard, one already free, or one named twice is pushed at most once, so the
        stack never holds an id twice.
        """
        self._check_on_demand("release")
        rows = jnp.asarray(rows)
        batch, max_pages = self.block_table.shape
        if rows.dtype != jnp.bool_ or rows.shape != (batch,):
            raise TypeError(f"rows must be a ({batch},) bool mask, got shape {tuple(rows.shape)} and dtype "
                            f"{np.dtype(rows.dtype).name}")
        rows = rows_placed_like(rows, self.block_table)
        free_pages, free_count, table = jax.vmap(release_in_shard, axis_name="page_shard")(
            self.free_pages, self.free_count, self._by_shard(self.block_table), self._by_shard(rows))
        return dataclasses.replace(self, free_pages=free_pages, free_count=free_count,
                                   block_table=table.reshape(batch, max_pages),
                                   seqlens=jnp.where(rows, 0, self.seqlens).astype(jnp.int32))

    def fork(self, sources) -> tuple["PagedKVCache", jax.Array]:
        """On-demand paging: sources, a (b,) integer array, makes row i a copy of row sources[i] as it was before
        the call (a common prompt, parallel sampling); a negative value (or i itself) leaves row i as it is.

        The copy shares the source's full pages (both rows name them; neither writes into them, see `reserve`) and
        gets a page of its own holding a copy of the source's partial last page, so each row goes on in a page of
        its own. The copy's previous pages go back to the stack unless another row names them.

        Returns (cache, granted), granted a (b,) bool: False for a row whose source lies past the batch or in
        another page shard (a mesh's shard of the batch; `page_shards`), is itself asked to become a copy in this
        call, or needs a page its shard's pool cannot give (rows served in order, as in `reserve`); such a row
        stays as it is.
        """
        self._check_on_demand("fork")
        batch, max_pages = self.block_table.shape
        sources = integers_within(sources, -1, batch)
        if not jnp.issubdtype(sources.dtype, jnp.integer) or sources.shape != (batch,):
            raise TypeError(f"sources must be a ({batch},) integer array of row indices (-1: none), got shape "
                            f"{tuple(sources.shape)} and dtype {np.dtype(sources.dtype).name}")
        rows_per_shard = batch // self.free_pages.shape[0]
        sources = ints_as_int32(sources, -1, batch)
        # Within the shard: the source's index there; -1 for none; rows_per_shard (refused) for a source in another
        # shard or past the batch.
        shard_start = (jnp.arange(batch, dtype=jnp.int32) // rows_per_shard) * rows_per_shard
        in_shard = (sources >= shard_start) & (sources < shard_start + rows_per_shard)
        local = jnp.where(in_shard, sources - shard_start, jnp.where(sources < 0, -1, rows_per_shard))
        refused_elsewhere = ~in_shard & (sources >= 0)
        lengths = jnp.clip(self.seqlens, 0, self.capacity)
        place = lambda x: self._by_shard(rows_placed_like(x, self.block_table))  # noqa: E731
        free_pages, free_count, table, forked_lengths, forked, granted, copy_from, copy_to = jax.vmap(
            fork_in_shard, axis_name="page_shard")(self.free_pages, self.free_count, self._by_shard(self.block_table),
                                                   place(lengths), place(local))
        seqlens = jnp.where(forked.reshape(batch), forked_lengths.reshape(batch), self.seqlens).astype(jnp.int32)
        cache = dataclasses.replace(self, free_pages=free_pages, free_count=free_count,
                                    block_table=table.reshape(batch, max_pages), seqlens=seqlens)
        return (cache._copy_pages(copy_from.reshape(batch), copy_to.reshape(batch)),
                granted.reshape(batch) & ~refused_elsewhere)

    def _copy_pages(self, copy_from: jax.Array, copy_to: jax.Array) -> "PagedKVCache":
        """pages[:, copy_to[i]] = pages[:, copy_from[i]] in every layer (and the indexer keys), for copy_to[i] >= 0."""
        num_pages = self.pages.shape[1]
        to = jnp.where((copy_to >= 0) & (copy_to < num_pages), copy_to, num_pages)  # num_pages: dropped
        copy_from, to = (rows_placed_like(x, self.block_table) for x in (copy_from, to))
        # Partitioned like a write over a mesh (sharding.py): each shard copies within its own pages.
        index_pages = None if self.index_pages is None else copy_pages(self.index_pages, copy_from, to)
        return dataclasses.replace(self, pages=copy_pages(self.pages, copy_from, to), index_pages=index_pages)

    def _by_shard(self, per_row: jax.Array) -> jax.Array:
        """(b, ...) -> (page_shards, b // page_shards, ...): each page shard's rows, in order."""
        shards = self.free_pages.shape[0]
        return per_row.reshape(shards, per_row.shape[0] // shards, *per_row.shape[1:])

    def _check_on_demand(self, what: str) -> None:
        if self.free_pages is None or self.free_count is None:
            raise ValueError(f"{what} is for on-demand paging: create the cache with on_demand=True")
        shards, per_shard = self.free_pages.shape if self.free_pages.ndim == 2 else (None, None)
        batch, num_pages = self.block_table.shape[0], self.pages.shape[1]
        if (shards is None or self.free_count.shape != (shards,) or batch % shards or shards * per_shard != num_pages
                or self.free_pages.dtype != jnp.int32 or self.free_count.dtype != jnp.int32):
            raise ValueError(f"free_pages must be int32 (page_shards, num_pages // page_shards) and free_count int32 "
                             f"(page_shards,), with page_shards dividing the batch ({batch}) and num_pages "
                             f"({num_pages}); got {tuple(self.free_pages.shape)} {np.dtype(self.free_pages.dtype).name}"
                             f" and {tuple(self.free_count.shape)} {np.dtype(self.free_count.dtype).name}")

    def append(self, kv, *, layer=0, num_new=None, index_keys=None) -> "PagedKVCache":
        """write then advance by s_new, or by num_new clipped to [0, s_new]: a row never advances past the slots
        written for it (tokens on an invalid page id are dropped but counted). The single-layer convenience.
        A cache with indexer keys needs the tokens' keys too (index_keys, as write_index_keys takes them): a
        position counted without its key would be scored from a stale slot."""
        if (index_keys is None) != (self.index_pages is None):
            raise ValueError("index_keys= must be given exactly when the cache keeps indexer keys (index_pages is "
                             f"{'None' if self.index_pages is None else 'set'})")
        s_new = jnp.shape(kv)[1] if jnp.ndim(kv) >= 2 else None
        count = s_new if num_new is None else jnp.clip(self._token_counts(num_new), 0, s_new)
        cache = self
        if self.is_on_demand:  # pages first; a row the pool cannot serve stores nothing and stays where it is
            self._check_entries(kv)
            cache, granted = self.reserve(count)
            count = num_new = jnp.where(granted, count, 0)
        cache = cache.write(kv, layer=layer, num_new=num_new)
        if index_keys is not None:
            if jnp.shape(index_keys)[1:2] != (s_new,):
                raise ValueError(f"index_keys must hold the same {s_new} tokens as kv, got shape "
                                 f"{tuple(jnp.shape(index_keys))}")
            cache = cache.write_index_keys(index_keys, layer=layer, num_new=num_new)
        return cache.advance(count)

    def _token_counts(self, counts) -> jax.Array:
        """num_new, an int or a (b,) integer array of per-row token counts, as (b,) int32."""
        counts = integers_within(counts, -(2**30), 2**30)
        batch = self.block_table.shape[0]
        if not jnp.issubdtype(counts.dtype, jnp.integer) or counts.shape not in ((), (batch,)):
            raise TypeError(f"num_new must be an int or a ({batch},) integer array, got shape {tuple(counts.shape)} "
                            f"and dtype {np.dtype(counts.dtype).name}")
        # Into int32 without wrapping (a uint32 2**32 - 1 must not turn into -1); +-2**30 bounds any capacity.
        return jnp.broadcast_to(ints_as_int32(counts, -(2**30), 2**30), (batch,))

