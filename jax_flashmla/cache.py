"""A paged latent-KV cache as a JAX pytree.

Layout: one page pool per layer, stacked on a leading axis, (num_layers, num_pages, 64, h_kv, d); one block
table (b, max_pages_per_seq) int32 and one length vector (b,) int32 shared by all layers.

Page hand-out, kept simple: `create` gives sequence i the pages i*max_pages .. (i+1)*max_pages - 1, a
static reservation of max_seq_len tokens per sequence. Any other assignment (a host-side allocator, pages
shared between sequences' common prefixes) is just another block_table: pass it to `create` or replace the
field; the kernels and `write` only ever follow the table.

Writes go through scatters on the device. Inside `jax.jit(..., donate_argnums=...)` with the cache donated,
XLA updates the pool in place: a decode step moves only the new tokens' bytes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .constants import PAGE_SIZE
from .sharding import scatter_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    pages: jax.Array  # (num_layers, num_pages, 64, h_kv, d)
    block_table: jax.Array  # (b, max_pages_per_seq) int32
    seqlens: jax.Array  # (b,) int32, tokens stored per sequence

    @classmethod
    def create(cls, *, batch_size: int, max_seq_len: int, num_layers: int = 1, num_heads_k: int = 1,
               head_dim: int = 576, dtype=jnp.bfloat16, block_table=None, num_pages: int | None = None):
        """An empty cache with room for max_seq_len tokens per sequence."""
        if batch_size < 1 or max_seq_len < 1 or num_layers < 1 or num_heads_k < 1:
            raise ValueError("batch_size, max_seq_len, num_layers and num_heads_k must be positive, got "
                             f"{batch_size}, {max_seq_len}, {num_layers}, {num_heads_k}")
        max_pages = -(-max_seq_len // PAGE_SIZE)
        if block_table is None:
            block_table = jnp.arange(batch_size * max_pages, dtype=jnp.int32).reshape(batch_size, max_pages)
            num_pages = batch_size * max_pages if num_pages is None else num_pages
        else:
            block_table = jnp.asarray(block_table)
            if block_table.dtype != jnp.int32 or block_table.ndim != 2 or block_table.shape[0] != batch_size:
                raise ValueError(f"block_table must be int32 of shape ({batch_size}, max_pages), got shape "
                                 f"{tuple(block_table.shape)} and dtype {np.dtype(block_table.dtype).name}")
            if num_pages is None:
                raise ValueError("num_pages is required with a custom block_table")
        pages = jnp.zeros((num_layers, num_pages, PAGE_SIZE, num_heads_k, head_dim), dtype)
        return cls(pages=pages, block_table=block_table, seqlens=jnp.zeros((batch_size,), jnp.int32))

    @property
    def capacity(self) -> int:
        """Tokens each sequence can hold: 64 * max_pages_per_seq."""
        return self.block_table.shape[1] * PAGE_SIZE

    @property
    def num_layers(self) -> int:
        return self.pages.shape[0]

    def layer_pages(self, layer) -> jax.Array:
        """The page pool of one layer, (num_pages, 64, h_kv, d), FlashMLA's k_cache. flash_mla_with_kvcache
        also takes `pages` with layer=, which the kernels read in place whatever XLA does with a slice."""
        return self.pages[layer]

    def write(self, kv, *, layer=0, num_new=None) -> "PagedKVCache":
        """Store kv (b, s_new, h_kv, d) at positions seqlens[i] + j of `layer`'s pool; seqlens unchanged.

        num_new (b,) int32, optional: write only the first num_new[i] tokens of row i (ragged prefill).
        Tokens that fall past the capacity or on an invalid page id are dropped, never written elsewhere.
        """
        kv = jnp.asarray(kv)
        batch, s_new = kv.shape[:2]
        _, num_pages, _, h_kv, head_dim = self.pages.shape
        if kv.ndim != 4 or kv.shape[0] != self.block_table.shape[0] or kv.shape[2:] != (h_kv, head_dim):
            raise ValueError(f"kv must have shape ({self.block_table.shape[0]}, s_new, {h_kv}, {head_dim}), "
                             f"got {tuple(kv.shape)}")
        positions = self.seqlens[:, None] + jnp.arange(s_new, dtype=jnp.int32)[None, :]  # (b, s_new)
        keep = (positions >= 0) & (positions < self.capacity)
        if num_new is not None:
            keep &= jnp.arange(s_new)[None, :] < jnp.asarray(num_new, jnp.int32).reshape(batch, 1)
        page_slot = jnp.clip(positions // PAGE_SIZE, 0, self.block_table.shape[1] - 1)
        page = jnp.take_along_axis(self.block_table, page_slot, axis=1)
        keep &= (page >= 0) & (page < num_pages)
        # Dropped tokens get an out-of-range page id, which mode="drop" discards.
        page = jnp.where(keep, page, num_pages)
        # The scatter partitions over a mesh like the decode (jax_flashmla/sharding.py).
        pages = scatter_tokens(self.pages, kv.astype(self.pages.dtype), page, positions % PAGE_SIZE,
                               jnp.asarray(layer, jnp.int32))
        return dataclasses.replace(self, pages=pages)

    def advance(self, num_new) -> "PagedKVCache":
        """seqlens += num_new (an int, or (b,) int32), saturating at the capacity."""
        seqlens = jnp.minimum(self.seqlens + jnp.asarray(num_new, jnp.int32), self.capacity)
        return dataclasses.replace(self, seqlens=seqlens.astype(jnp.int32))

    def append(self, kv, *, layer=0, num_new=None) -> "PagedKVCache":
        """write then advance by s_new (or num_new): the single-layer convenience."""
        count = kv.shape[1] if num_new is None else num_new
        return self.write(kv, layer=layer, num_new=num_new).advance(count)
