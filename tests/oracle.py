"""An independent float64 NumPy oracle for paged MLA decode: plain loops, written from the semantics in
reference.py's docstring, not from its code."""

import numpy as np

PAGE = 64


def decode_oracle(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, attn_sink=None):
    """attn_sink: (h_q,) logits of a sink key with a zero value vector, left out of lse."""
    q = np.asarray(q, np.float64)
    k_cache = np.asarray(k_cache, np.float64)
    block_table = np.asarray(block_table)
    batch, s_q, h_q, _ = q.shape
    num_pages, _, h_kv, _ = k_cache.shape
    group = h_q // h_kv
    out = np.zeros((batch, s_q, h_q, head_dim_v))
    lse = np.full((batch, h_q, s_q), np.inf)
    capacity = block_table.shape[1] * PAGE
    for i in range(batch):
        length = min(max(int(cache_seqlens[i]), 0), capacity)
        for s in range(s_q):
            limit = length - s_q + s + 1 if causal else length
            tokens = []
            for t in range(max(min(limit, length), 0)):
                page = int(block_table[i, t // PAGE])
                if 0 <= page < num_pages:
                    tokens.append((page, t % PAGE))
            if not tokens:
                continue
            for h in range(h_q):
                keys = np.stack([k_cache[pg, slot, h // group] for pg, slot in tokens])
                out[i, s, h], lse[i, h, s], _ = attend(q[i, s, h], keys, head_dim_v, softmax_scale,
                                                       None if attn_sink is None else attn_sink[h])
    return out, lse


def attend(query, keys, head_dim_v, softmax_scale, sink=None):
    """One query row over its keys (n >= 1, d), float64 -> (out (head_dim_v,), lse, max score); the sink, a
    logit whose value vector is zero, takes a share of the softmax and is left out of lse."""
    scores = keys @ query * softmax_scale
    top = scores.max()
    weights = np.exp(scores - top)
    sink_weight = 0.0 if sink is None else np.exp(np.float64(sink) - top)
    return weights @ keys[:, :head_dim_v] / (weights.sum() + sink_weight), np.log(weights.sum()) + top, top


def sparse_decode_oracle(q, scopes, head_dim_v, softmax_scale, attn_sink=None):
    """Sparse decode from its semantics (reference.py's docstring). scopes: (k_cache float (num_pages, page_size,
    h_kv, d), indices (b, s_q, topk), topk_length (b,) or None) for the cache and the extra cache; each query
    attends to the keys all scopes name, in order."""
    q = np.asarray(q, np.float64)
    batch, s_q, h_q, _ = q.shape
    out = np.zeros((batch, s_q, h_q, head_dim_v))
    lse = np.full((batch, h_q, s_q), np.inf)
    for i in range(batch):
        for s in range(s_q):
            tokens = []
            for k_cache, indices, topk_length in scopes:
                flat = np.asarray(k_cache, np.float64).reshape(-1, *np.shape(k_cache)[2:])
                limit = indices.shape[-1] if topk_length is None else min(max(int(topk_length[i]), 0), indices.shape[-1])
                tokens += [flat[t] for t in np.asarray(indices)[i, s, :limit] if 0 <= t < len(flat)]
            if not tokens:
                continue
            keys = np.stack(tokens)  # (n, h_kv, d)
            group = h_q // keys.shape[1]
            for h in range(h_q):
                out[i, s, h], lse[i, h, s], _ = attend(q[i, s, h], keys[:, h // group], head_dim_v, softmax_scale,
                                                       None if attn_sink is None else attn_sink[h])
    return out, lse


def sparse_prefill_oracle(q, kv, indices, head_dim_v, softmax_scale, topk_length=None, attn_sink=None):
    """flash_mla_sparse_fwd from its semantics: q (s_q, h_q, d), kv (s_kv, h_kv, d), indices (s_q, h_kv, topk)
    -> out, max_logits (-inf where no key), lse (+inf where no key)."""
    q, kv, indices = np.asarray(q, np.float64), np.asarray(kv, np.float64), np.asarray(indices)
    s_q, h_q, _ = q.shape
    s_kv, h_kv, _ = kv.shape
    out = np.zeros((s_q, h_q, head_dim_v))
    max_logits = np.full((s_q, h_q), -np.inf)
    lse = np.full((s_q, h_q), np.inf)
    for s in range(s_q):
        limit = indices.shape[-1] if topk_length is None else min(max(int(topk_length[s]), 0), indices.shape[-1])
        for h in range(h_q):
            kv_head = h // (h_q // h_kv)
            tokens = [kv[t, kv_head] for t in indices[s, kv_head, :limit] if 0 <= t < s_kv]
            if tokens:
                out[s, h], lse[s, h], max_logits[s, h] = attend(q[s, h], np.stack(tokens), head_dim_v, softmax_scale,
                                                                None if attn_sink is None else attn_sink[h])
    return out, max_logits, lse


def problem_oracle(p, causal, softmax_scale=576**-0.5, attn_sink=None):
    """decode_oracle of a cases.Problem, float32 inputs widened here; the pool's unowned slots hold NaN, which no
    visible key reaches, made finite all the same."""
    with np.errstate(over="ignore"):  # exp of a sink of +inf
        return decode_oracle(np.asarray(p.q, np.float32), np.nan_to_num(np.asarray(p.k_cache, np.float32), nan=1e30),
                             p.block_table, p.cache_seqlens, 512, softmax_scale, causal, attn_sink=attn_sink)
