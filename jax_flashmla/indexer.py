"""DeepSeek-V3.2's lightning indexer: which earlier tokens each query token attends to.

For a query token t and a key token s the indexer's score is

    I(t, s) = sum_h w(t, h) * relu(q(t, h) . k(s) / sqrt(head_dim)),   w(t, h) = weights_proj(x_t)_h / sqrt(n_heads)

with n_heads small queries q(t, h) made from the query's low-rank latent (MLA's q_a_layernorm(q_a_proj(x))), one
LayerNorm-ed key k(s) per token made from its hidden state, and rotary embedding on the first qk_rope_head_dim
dims of both in the half-split (GPT-NeoX) layout, where MLA's own rope is interleaved. Each query keeps the
`topk` tokens it may see (causally, within its sequence) with the highest scores; sparse MLA attends to those.

DeepSeek's own code rotates q and k by a Hadamard transform and scores in FP8. The rotation is orthonormal, so it
changes no score but through the FP8 rounding it exists for; here the keys keep the cache's 16/32-bit dtype, no
rotation, and the scores are summed in float32 (as HF transformers' DeepseekV32Indexer computes them).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .rope import apply_rope, rope_attention_factor, rope_inv_freq


# Keys scored per step: the per-head logits of a step, (b, s_q, n_heads, KEYS_PER_STEP) float32, are what a step
# keeps (64 MiB at b 128, s_q 1, 64 heads) where all keys at once would keep (..., n_keys) (1 GiB at a 32k cache).
KEYS_PER_STEP = 2048


def index_scores(q: jax.Array, weights: jax.Array, keys: jax.Array, visible: jax.Array, *,
                 keys_per_step: int = KEYS_PER_STEP) -> jax.Array:
    """The indexer's scores, float32 (b, s_q, n_keys); -inf where `visible` (b, s_q, n_keys) is False.

    q (b, s_q, n_heads, head_dim), weights (b, s_q, n_heads) (already scaled by n_heads ** -0.5), keys
    (b, n_keys, head_dim). Each key's score is its own column, masked after: a NaN in a slot no query sees (one
    never written) reaches no other key's score. Keys are scored keys_per_step at a time (a fori_loop over slices
    of keys, the last one ending at n_keys and overlapping the one before where keys_per_step does not divide
    n_keys), which bounds the per-head logits kept at once and copies no key.
    """
    head_dim = q.shape[-1]
    weights = weights.astype(jnp.float32)

    def score(key_block):  # (b, n, d) -> (b, s_q, n)
        logits = jnp.einsum("bqhd,bkd->bqhk", q, key_block, preferred_element_type=jnp.float32) * head_dim**-0.5
        return jnp.einsum("bqh,bqhk->bqk", weights, jax.nn.relu(logits))

    b, n_keys, _ = keys.shape
    if n_keys <= keys_per_step:
        scores = score(keys)
    else:
        def step(i, scores):
            start = jnp.minimum(i * keys_per_step, n_keys - keys_per_step)
            block = score(jax.lax.dynamic_slice_in_dim(keys, start, keys_per_step, axis=1))
            return jax.lax.dynamic_update_slice_in_dim(scores, block, start, axis=2)

        scores = jax.lax.fori_loop(0, -(-n_keys // keys_per_step), step,
                                   jnp.zeros((b, q.shape[1], n_keys), jnp.float32))
    return jnp.where(visible, scores, -jnp.inf)


def select_topk(scores: jax.Array, topk: int) -> jax.Array:
    """int32 (b, s_q, topk) key positions of the `topk` highest scores of each query, best first; -1 where a query
    sees fewer than topk keys (its -inf scores), the "no token" that sparse attention ignores. Ties go to the lower
    position."""
    n_keys = scores.shape[-1]
    best, positions = jax.lax.top_k(scores, min(topk, n_keys))
    positions = jnp.where(best > -jnp.inf, positions, -1).astype(jnp.int32)
    if topk > n_keys:
        positions = jnp.pad(positions, [(0, 0)] * (positions.ndim - 1) + [(0, topk - n_keys)], constant_values=-1)
    return positions


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale and bias (DeepSeek-V3.2's indexer k_norm), in float32, cast back."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        normed = (xf - mean) * jax.lax.rsqrt(jnp.var(xf, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class LightningIndexer(nnx.Module):
    """The indexer of one DeepSeek-V3.2 attention layer. Parameter names follow DeepSeek's checkpoints
    (wq_b, wk, k_norm, weights_proj; kernels are (in, out)). weights_proj is kept and run in float32, as DeepSeek
    keeps it, whatever param_dtype.

    The MLA module owns it (MLAConfig.index_topk) and keeps its keys beside the latent cache
    (PagedKVCache.index_pages).
    """

    def __init__(self, *, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_head_dim: int,
                 rope_theta: float, yarn, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.n_heads, self.head_dim, self.rope_head_dim = n_heads, head_dim, rope_head_dim
        self.rope_theta, self.yarn = rope_theta, yarn

        def linear(d_in, d_out, dtype, param_dtype):
            return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.wq_b = linear(q_lora_rank, n_heads * head_dim, dtype, param_dtype)
        self.wk = linear(hidden_size, head_dim, dtype, param_dtype)
        self.k_norm = LayerNorm(head_dim, param_dtype=param_dtype)
        self.weights_proj = linear(hidden_size, n_heads, jnp.float32, jnp.float32)

    def _rope(self, x, positions):
        """Half-split rope on the first rope_head_dim dims of x (b, s, heads, head_dim), the rest passed through."""
        inv_freq = rope_inv_freq(self.rope_head_dim, self.rope_theta, self.yarn)
        roped = apply_rope(x[..., : self.rope_head_dim], positions, inv_freq, rope_attention_factor(self.yarn),
                           interleave=False)
        return jnp.concatenate([roped, x[..., self.rope_head_dim :]], axis=-1)

    def keys(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x (b, s, hidden) at positions (b, s) -> the tokens' index keys (b, s, head_dim), what the cache keeps."""
        return self._rope(self.k_norm(self.wk(x))[:, :, None, :], positions)[:, :, 0, :]

    def queries(self, x: jax.Array, q_lora: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (b, s, hidden) and MLA's low-rank query latent q_lora (b, s, q_lora_rank) at positions (b, s) -> the
        index queries (b, s, n_heads, head_dim) and their head weights (b, s, n_heads) float32, scaled by
        n_heads ** -0.5."""
        q = self.wq_b(q_lora).reshape(*x.shape[:2], self.n_heads, self.head_dim)
        weights = self.weights_proj(x.astype(jnp.float32)) * self.n_heads**-0.5
        return self._rope(q, positions), weights

    def select(self, x, q_lora, positions, keys, visible, topk: int) -> jax.Array:
        """The top-k key positions (b, s, topk) int32 of each query (-1 past the keys it sees); keys (b, n, head_dim)
        and visible (b, s, n) as index_scores takes them."""
        q, weights = self.queries(x, q_lora, positions)
        return select_topk(index_scores(q, weights, keys, visible), topk)
