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
                scores = keys @ q[i, s, h] * softmax_scale
                top = scores.max()
                weights = np.exp(scores - top)
                sink_weight = 0.0 if attn_sink is None else np.exp(np.float64(attn_sink[h]) - top)
                out[i, s, h] = weights @ keys[:, :head_dim_v] / (weights.sum() + sink_weight)
                lse[i, h, s] = np.log(weights.sum()) + top
    return out, lse


def problem_oracle(p, causal, softmax_scale=576**-0.5, attn_sink=None):
    """decode_oracle of a cases.Problem, float32 inputs widened here; the pool's unowned slots hold NaN, which no
    visible key reaches, made finite all the same."""
    with np.errstate(over="ignore"):  # exp of a sink of +inf
        return decode_oracle(np.asarray(p.q, np.float32), np.nan_to_num(np.asarray(p.k_cache, np.float32), nan=1e30),
                             p.block_table, p.cache_seqlens, 512, softmax_scale, causal, attn_sink=attn_sink)
