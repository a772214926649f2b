"""Sparse attention as XLA runs it, on every platform (there is no CUDA kernel for it yet).

The math is reference.py's, taken over the keys KEYS_PER_STEP at a time in a lax.scan with an online softmax
(running max, running sum, rescaled accumulator), so its memory grows with one chunk of keys, not with topk (under
autodiff each step is recomputed, so a gradient keeps the carries of the steps, not their keys and scores): in
one piece, a V3.2 prefill chunk of 4096 query tokens with topk 2048 and 128 heads would gather 4096 * 2048 tokens
and score 4096 * 128 * 2048 logits. The scan runs over the keys' axis, which no mesh splits, so the query axes stay
partitioned as they come.

The products take q's 16-bit dtype when the keys share it (float32 sums): tensor cores on a GPU. P is rounded
to that dtype before P @ V, as the kernels do. float32 inputs run in float32 at full precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .reference import gather_prefill_keys, gather_sparse_keys, normalise_rows, sparse_index_ok

KEYS_PER_STEP = 512  # keys a scan step gathers per query token: 512 * 576 * 2 bytes = 576 KiB a token


def compute_dtype(q_dtype, is_fp8_kvcache: bool):
    """The products' operand dtype: q's, except that FP8 tokens unpack exactly into bfloat16 only (float16's range
    may not hold a tile's values): a float16 q with an FP8 cache computes in float32."""
    if is_fp8_kvcache and q_dtype != jnp.bfloat16:
        return jnp.float32
    return q_dtype


def _chunked(indices, keys_per_step: int):
    """(n, h, T) -> (steps, n, h, C), C = min(keys_per_step, T), padded with -1 (an ignored index)."""
    n, h, num_keys = indices.shape
    size = min(keys_per_step, num_keys)
    steps = -(-num_keys // size)
    indices = jnp.pad(indices, ((0, 0), (0, 0), (0, steps * size - num_keys)), constant_values=-1)
    return jnp.moveaxis(indices.reshape(n, h, steps, size), 2, 0)


def _attend(queries, sources, *, head_dim_v: int, softmax_scale: float, keys_per_step: int):
    """queries (n, h_kv, g, d) in the compute dtype; sources: (indices (n, h, T) with -1 wherever a key is ignored,
    gather(chunk (n, h, C)) -> keys (n, h_kv, C, d) zero where ignored, valid (n, h_kv or 1, C)), attended in
    order as if concatenated -> out (n, h_kv, g, head_dim_v) float32, lse (n, h_kv, g) (+inf for a query that saw
    no key), max_logits (n, h_kv, g) (-inf for it)."""
    n, h_kv, group, _ = queries.shape
    dtype = queries.dtype
    product = functools.partial(jnp.einsum, preferred_element_type=jnp.float32,
                                precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None)

    def step(gather, carry, chunk):
        row_max, row_sum, acc = carry
        keys, valid = gather(chunk)
        scores = product("nkgd,nkcd->nkgc", queries, keys) * softmax_scale
        scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))  # NaN (a NaN key) carries through
        # The old sums are rescaled to the new max. An unchanged max rescales by 1, never by exp(inf - inf) (a max
        # of -inf before any key, whose sums are 0, or of +inf after an infinite score); a NaN stays NaN.
        rescale = jnp.where(row_max == new_max, 1.0, jnp.exp(row_max - new_max))
        probs = jnp.exp(scores - jnp.where(jnp.isfinite(new_max), new_max, 0.0)[..., None])
        row_sum = row_sum * rescale + jnp.sum(probs, axis=-1)
        acc = acc * rescale[..., None] + product("nkgc,nkcv->nkgv", probs.astype(dtype), keys[..., :head_dim_v])
        return (new_max, row_sum, acc), None

    carry = (jnp.full((n, h_kv, group), -jnp.inf, jnp.float32), jnp.zeros((n, h_kv, group), jnp.float32),
             jnp.zeros((n, h_kv, group, head_dim_v), jnp.float32))
    for indices, gather in sources:
        # Rematerialised under autodiff, so that a gradient keeps each step's carry, not its keys and scores.
        carry, _ = jax.lax.scan(jax.checkpoint(functools.partial(step, gather)), carry,
                                _chunked(indices, keys_per_step))
    row_max, row_sum, acc = carry
    out, lse = normalise_rows(acc, jnp.where(jnp.isfinite(row_max), row_max, 0.0)[..., None], row_sum[..., None])
    return out, lse[..., 0], row_max


def _masked(indices, num_tokens: int, topk_length):
    """indices with -1 wherever reference.sparse_index_ok ignores them (so a chunk needs no topk_length)."""
    return jnp.where(sparse_index_ok(indices, num_tokens, topk_length), indices, -1)


def sparse_decode(q, k_cache, indices, *, head_dim_v: int, softmax_scale: float, dtype, topk_length=None,
                  extra_k_cache=None, extra_indices=None, extra_topk_length=None, keys_per_step=KEYS_PER_STEP):
    """reference.sparse_decode_reference's results (same arguments, products in `dtype`), in chunks of keys."""
    batch, s_q, h_q, head_dim = q.shape
    n, h_kv = batch * s_q, k_cache.shape[2]
    sources = []
    for cache, cache_indices, lengths in ((k_cache, indices, topk_length),
                                          (extra_k_cache, extra_indices, extra_topk_length)):
        if cache is None:
            continue
        num_tokens = cache.shape[0] * cache.shape[1]
        flat = _masked(cache_indices, num_tokens, lengths).reshape(n, 1, -1)

        def gather(chunk, cache=cache):
            keys, valid = gather_sparse_keys(cache, chunk, dtype=dtype)  # (n, 1, C, h_kv, d), (n, 1, C)
            return jnp.moveaxis(keys[:, 0], 2, 1), valid

        sources.append((flat, gather))
    queries = q.astype(dtype).reshape(n, h_kv, h_q // h_kv, head_dim)
    out, lse, _ = _attend(queries, sources, head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                          keys_per_step=keys_per_step)
    return (out.reshape(batch, s_q, h_q, head_dim_v).astype(q.dtype),
            lse.reshape(batch, s_q, h_q).transpose(0, 2, 1))


def sparse_prefill(q, kv, indices, *, head_dim_v: int, softmax_scale: float, topk_length=None,
                   keys_per_step=KEYS_PER_STEP):
    """reference.sparse_prefill_reference's results (products in q's dtype), in chunks of keys."""
    s_q, h_q, head_dim = q.shape
    h_kv = kv.shape[1]
    gather = functools.partial(gather_prefill_keys, kv, dtype=q.dtype)
    sources = [(_masked(indices, kv.shape[0], topk_length), gather)]
    out, lse, max_logits = _attend(q.reshape(s_q, h_kv, h_q // h_kv, head_dim), sources, head_dim_v=head_dim_v,
                                   softmax_scale=softmax_scale, keys_per_step=keys_per_step)
    return out.reshape(s_q, h_q, head_dim_v).astype(q.dtype), max_logits.reshape(s_q, h_q), lse.reshape(s_q, h_q)
