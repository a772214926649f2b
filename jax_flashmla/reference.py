"""The executable specification of MLA decode over a paged KV cache, in float32 jnp.

Every platform without the CUDA kernels lowers `flash_mla_with_kvcache` to this function, and the GPU tests
compare the kernels against it. Semantics, shared with the kernels:
  * the KV of sequence i is pages block_table[i, 0], block_table[i, 1], ... of k_cache, 64 tokens each;
    its length is L_i = clip(cache_seqlens[i], 0, 64 * max_pages);
  * a token whose page id lies outside [0, num_pages) is ignored (as if masked);
  * the values are the first head_dim_v dims of each key; query head h reads KV head h // (h_q // h_kv);
  * causal with s_q > 1 aligns the queries to the end: query token s sees keys [0, L - s_q + s];
  * a query that sees no key gets out = 0 and lse = +inf (FlashMLA's convention for empty sequences);
  * an optional attention sink (apply_attention_sink) acts on out alone, after the decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .constants import PAGE_SIZE

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products even where the default would use TF32


def gather_pages(k_cache, block_table):
    """(num_pages, 64, h_kv, d) pages, (b, max_pages) table -> keys (b, max_pages*64, h_kv, d), valid (b, T)."""
    num_pages = k_cache.shape[0]
    batch, max_pages = block_table.shape
    page_ok = (block_table >= 0) & (block_table < num_pages)
    keys = k_cache[jnp.where(page_ok, block_table, 0)]  # (b, max_pages, 64, h_kv, d)
    keys = keys.reshape(batch, max_pages * PAGE_SIZE, *k_cache.shape[2:])
    return keys, jnp.repeat(page_ok, PAGE_SIZE, axis=1)


def visible_keys(cache_seqlens, s_q: int, num_tokens: int, causal: bool):
    """Boolean (b, s_q, T): may query token s of sequence i attend to key t?"""
    lengths = jnp.clip(cache_seqlens, 0, num_tokens)
    limit = jnp.broadcast_to(lengths[:, None], (lengths.shape[0], s_q))  # keys [0, limit) are visible
    if causal:
        limit = limit - s_q + 1 + jnp.arange(s_q)[None, :]
    return jnp.arange(num_tokens)[None, None, :] < limit[:, :, None]


def mla_decode_reference(q, k_cache, block_table, cache_seqlens, *, head_dim_v: int, softmax_scale: float,
                         causal: bool):
    """Returns out (b, s_q, h_q, head_dim_v) in q.dtype and lse (b, h_q, s_q) float32."""
    batch, s_q, h_q, head_dim = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv

    keys, page_ok = gather_pages(k_cache, block_table)
    num_tokens = keys.shape[1]
    in_sequence = visible_keys(cache_seqlens, 1, num_tokens, causal=False)[:, 0, :] & page_ok  # (b, T)
    # Zero the keys no query may see: unused page slots may hold NaN, and 0 * NaN would leak into P @ V.
    keys = jnp.where(in_sequence[:, :, None, None], keys.astype(jnp.float32), 0.0)
    mask = visible_keys(cache_seqlens, s_q, num_tokens, causal) & page_ok[:, None, :]  # (b, s_q, T)

    queries = q.astype(jnp.float32).reshape(batch, s_q, h_kv, group, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", queries, keys, precision=_HIGHEST) * softmax_scale
    scores = jnp.where(mask[:, None, None, :, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max)
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    weighted = jnp.einsum("bkgst,btkv->bkgsv", probs, keys[..., :head_dim_v], precision=_HIGHEST)
    seen_any = row_sum > 0
    out = jnp.where(seen_any, weighted / jnp.where(seen_any, row_sum, 1.0), 0.0)
    lse = jnp.where(seen_any, jnp.log(jnp.where(seen_any, row_sum, 1.0)) + row_max, jnp.inf)

    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, s_q, h_q, head_dim_v).astype(q.dtype)
    lse = lse[..., 0].reshape(batch, h_q, s_q)  # (b, h_kv, g, s_q) -> (b, h_q, s_q)
    return out, lse


def apply_attention_sink(out, lse, attn_sink):
    """out (b, s_q, h_q, dv) times exp(lse) / (exp(lse) + exp(attn_sink[h])), in float32, cast back to out's dtype.

    The sink is one more logit per query head whose value vector is zero: it takes a share of the softmax
    and gives nothing back. Written as sigmoid(lse - sink) so neither exponential overflows. A sink of -inf
    leaves out as it is, +inf zeroes it, NaN makes it NaN; a query that saw no key (lse = +inf, out = 0) stays 0.
    """
    sink = attn_sink.astype(jnp.float32)[None, :, None]  # (1, h_q, 1), against lse (b, h_q, s_q)
    # A sink of +inf gives 0; the sigmoid never sees it (lse = +inf would make inf - inf, NaN even in a gradient).
    sink_is_inf = sink == jnp.inf
    factor = jnp.where(sink_is_inf, 0.0, jax.nn.sigmoid(lse - jnp.where(sink_is_inf, 0.0, sink)))
    factor = factor.transpose(0, 2, 1)[..., None]  # (b, s_q, h_q, 1)
    return (out.astype(jnp.float32) * factor).astype(out.dtype)
