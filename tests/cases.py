"""Random paged-decode problems in FlashMLA's test style: q ~ randn/10 clipped to +-1, keys ~ randn/10,
unused page slots filled with NaN, unused block-table entries set to a huge page id."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PAGE = 64
UNUSED_PAGE_ID = 2147480000
INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)  # hostile runtime values


@dataclasses.dataclass
class Problem:
    q: jax.Array
    k_cache: jax.Array
    block_table: jax.Array
    cache_seqlens: jax.Array


def lengths(rng: np.random.Generator, batch: int, s_k: int, varlen: bool, zero_one: bool) -> np.ndarray:
    if varlen:
        seqlens = np.clip(rng.normal(s_k, s_k / 2, batch), 0, 2 * s_k).astype(np.int32)
    else:
        seqlens = np.full(batch, s_k, np.int32)
    if zero_one and batch > 1:
        seqlens[rng.integers(batch)] = 0
    return seqlens


def make_problem(rng: np.random.Generator, *, batch, s_q, h_q, h_kv, seqlens, dtype, head_dim=576,
                 spare_pages=1) -> Problem:
    """Pages of each sequence are scattered over the pool by a random permutation."""
    pages_needed = -(-seqlens // PAGE)
    max_pages = int(pages_needed.max()) + spare_pages
    num_pages = int(pages_needed.sum()) + 1
    perm = rng.permutation(num_pages).astype(np.int32)
    table = np.full((batch, max_pages), UNUSED_PAGE_ID, np.int32)
    cursor = 0
    for i, n in enumerate(pages_needed):
        table[i, :n] = perm[cursor:cursor + n]
        cursor += n

    key = jax.random.key(int(rng.integers(2**31)))
    kq, kk = jax.random.split(key)
    q = jnp.clip(jax.random.normal(kq, (batch, s_q, h_q, head_dim), jnp.float32) / 10, -1, 1).astype(dtype)
    k_cache = (jax.random.normal(kk, (num_pages, PAGE, h_kv, head_dim), jnp.float32) / 10).astype(dtype)
    # NaN in every slot no sequence owns: a kernel that reads past a length shows it.
    owned = np.zeros((num_pages, PAGE), bool)
    for i, n in enumerate(pages_needed):
        for j in range(n):
            valid = min(PAGE, int(seqlens[i]) - j * PAGE)
            owned[table[i, j], :valid] = True
    k_cache = jnp.where(jnp.asarray(owned)[:, :, None, None], k_cache, jnp.nan).astype(dtype)
    return Problem(q, k_cache, jnp.asarray(table), jnp.asarray(seqlens))
