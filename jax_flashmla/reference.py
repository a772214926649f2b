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
Sparse attention (DeepSeek-V3.2; sparse_decode_reference, sparse_prefill_reference) reads the keys its indices
name instead of whole sequences:
  * an index counts tokens of the flattened cache: page * page_size + slot (FlashMLA's indices_in_kvcache);
  * an index outside [0, num_tokens), and every index at or past a row's topk_length, is ignored;
  * a repeated index is a repeated key (it counts twice), and there is no causal mask;
  * a packed FP8 cache (fp8_cache.py) is unpacked after the gather, so only the tokens read are unpacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .constants import PAGE_SIZE
from .fp8_cache import dequantize_kv_cache, is_packed_fp8

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
    probs, row_max, row_sum = _masked_softmax_parts(jnp.where(mask[:, None, None, :, :], scores, -jnp.inf))
    weighted = jnp.einsum("bkgst,btkv->bkgsv", probs, keys[..., :head_dim_v], precision=_HIGHEST)
    out, lse = normalise_rows(weighted, row_max, row_sum)

    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, s_q, h_q, head_dim_v).astype(q.dtype)
    lse = lse[..., 0].reshape(batch, h_q, s_q)  # (b, h_kv, g, s_q) -> (b, h_q, s_q)
    return out, lse


def _masked_softmax_parts(scores):
    """scores (..., T) with -inf where masked -> unnormalised probs, row max (finite, 0 for an empty row) and row
    sum (0 for an empty row), both (..., 1)."""
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max)
    return probs, row_max, jnp.sum(probs, axis=-1, keepdims=True)


def normalise_rows(weighted, row_max, row_sum):
    """probs @ V and the row statistics -> out (0 for a query that saw no key) and lse (..., 1) (+inf for it).
    A NaN key makes row_sum NaN, which must read as seen (NaN out), not as no key at all."""
    seen_any = row_sum != 0
    safe_sum = jnp.where(seen_any, row_sum, 1.0)
    out = jnp.where(seen_any, weighted / safe_sum, 0.0)
    return out, jnp.where(seen_any, jnp.log(safe_sum) + row_max, jnp.inf)


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


def sparse_index_ok(indices, num_tokens: int, topk_length=None):
    """Which entries of indices (n, ..., topk) name a key: inside [0, num_tokens) and, with topk_length (n,),
    before the row's topk_length."""
    ok = indices >= 0
    if num_tokens <= jnp.iinfo(jnp.int32).max:  # a larger cache holds every non-negative int32 index
        ok &= indices < num_tokens
    if topk_length is not None:
        rank = jnp.arange(indices.shape[-1], dtype=jnp.int32)
        ok &= rank < topk_length.reshape(topk_length.shape + (1,) * (indices.ndim - 1))
    return ok


def gather_sparse_keys(k_cache, indices, topk_length=None, dtype=jnp.float32):
    """k_cache (num_pages, page_size, h_kv, d), or packed FP8 tokens (..., 656); indices (b, s_q, topk) int32;
    topk_length (b,) int32 or None -> keys (b, s_q, topk, h_kv, 576 or d) in dtype, zero where ignored, and
    valid (b, s_q, topk)."""
    num_pages, page_size, h_kv, width = k_cache.shape
    tokens = k_cache.reshape(num_pages * page_size, h_kv, width)
    valid = sparse_index_ok(indices, tokens.shape[0], topk_length)
    rows = tokens[jnp.where(valid, indices, 0)]  # (b, s_q, topk, h_kv, width)
    rows = dequantize_kv_cache(rows, dtype) if is_packed_fp8(k_cache) else rows.astype(dtype)
    # Ignored entries read token 0, which may hold NaN; zeroed so that 0 * NaN cannot reach P @ V.
    return jnp.where(valid[..., None, None], rows, jnp.zeros((), dtype)), valid


def _sparse_attention(q, keys, valid, head_dim_v: int, softmax_scale: float):
    """q (n, h_q, d); keys (n, h_kv, T, d) float32, zero where not valid; valid (n, h_kv, T) -> out (n, h_q,
    head_dim_v) float32, lse (n, h_q), max_logits (n, h_q) (-inf for a query that saw no key)."""
    n, h_q, head_dim = q.shape
    h_kv = keys.shape[1]
    queries = q.astype(jnp.float32).reshape(n, h_kv, h_q // h_kv, head_dim)
    scores = jnp.einsum("nkgd,nktd->nkgt", queries, keys, precision=_HIGHEST) * softmax_scale
    scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
    probs, row_max, row_sum = _masked_softmax_parts(scores)
    weighted = jnp.einsum("nkgt,nktv->nkgv", probs, keys[..., :head_dim_v], precision=_HIGHEST)
    out, lse = normalise_rows(weighted, row_max, row_sum)
    return (out.reshape(n, h_q, head_dim_v), lse.reshape(n, h_q), jnp.max(scores, axis=-1).reshape(n, h_q))


def sparse_decode_reference(q, k_cache, indices, *, head_dim_v: int, softmax_scale: float, topk_length=None,
                            extra_k_cache=None, extra_indices=None, extra_topk_length=None):
    """DeepSeek-V3.2 sparse decode: query token s of sequence i attends to the keys indices[i, s, :] names (and
    extra_indices[i, s, :] in extra_k_cache, whose page size may differ), shared by all KV heads.

    q (b, s_q, h_q, d); k_cache (num_pages, page_size, h_kv, d) or packed FP8 (..., 656) with d = 576.
    Returns out (b, s_q, h_q, head_dim_v) in q.dtype and lse (b, h_q, s_q) float32, as the dense decode does.
    (The public API runs sparse_xla.py, the same math over chunks of keys.)
    """
    batch, s_q, h_q, head_dim = q.shape
    keys, valid = gather_sparse_keys(k_cache, indices, topk_length)
    if extra_k_cache is not None:
        extra_keys, extra_valid = gather_sparse_keys(extra_k_cache, extra_indices, extra_topk_length)
        keys = jnp.concatenate([keys, extra_keys], axis=2)
        valid = jnp.concatenate([valid, extra_valid], axis=2)
    n, num_keys, h_kv = batch * s_q, keys.shape[2], keys.shape[3]
    keys = keys.reshape(n, num_keys, h_kv, head_dim).transpose(0, 2, 1, 3)  # (n, h_kv, T, d)
    valid = jnp.broadcast_to(valid.reshape(n, 1, num_keys), (n, h_kv, num_keys))
    out, lse, _ = _sparse_attention(q.reshape(n, h_q, head_dim), keys, valid, head_dim_v, softmax_scale)
    out = out.reshape(batch, s_q, h_q, head_dim_v).astype(q.dtype)
    return out, lse.reshape(batch, s_q, h_q).transpose(0, 2, 1)


def gather_prefill_keys(kv, indices, topk_length=None, dtype=jnp.float32):
    """kv (s_kv, h_kv, d); indices (s_q, h_kv, topk) int32; topk_length (s_q,) or None -> keys (s_q, h_kv, topk, d)
    in dtype, zero where ignored, and valid (s_q, h_kv, topk)."""
    s_kv, h_kv = kv.shape[:2]
    valid = sparse_index_ok(indices, s_kv, topk_length)
    rows = kv[jnp.where(valid, indices, 0), jnp.arange(h_kv)[None, :, None]]
    return jnp.where(valid[..., None], rows.astype(dtype), jnp.zeros((), dtype)), valid


def sparse_prefill_reference(q, kv, indices, *, head_dim_v: int, softmax_scale: float, topk_length=None):
    """DeepSeek-V3.2 sparse prefill (FlashMLA's flash_mla_sparse_fwd): query token s reads, for KV head k, the
    tokens indices[s, k, :] of kv; query head h reads KV head h // (h_q // h_kv).

    q (s_q, h_q, d); kv (s_kv, h_kv, d); indices (s_q, h_kv, topk) int32; topk_length (s_q,) int32 or None.
    Returns out (s_q, h_q, head_dim_v) in q.dtype, max_logits (s_q, h_q) float32 (the largest scaled score,
    -inf for a query that saw no key) and lse (s_q, h_q) float32 (+inf for it).
    """
    keys, valid = gather_prefill_keys(kv, indices, topk_length)
    out, lse, max_logits = _sparse_attention(q, keys, valid, head_dim_v, softmax_scale)
    return out.astype(q.dtype), max_logits, lse
