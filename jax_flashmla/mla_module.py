"""DeepSeek-V3 Multi-head Latent Attention as a Flax NNX module, decoding through FlashMLA.

Shapes (DeepSeek-V3 defaults): h heads; per head a 128-dim "nope" query/key part, a 64-dim decoupled RoPE
part and a 128-dim value. Keys and values are not stored per head: each token keeps one 576-dim latent
entry [c_kv (512, RMS-normalised) | k_pe (64, roped)], shared by all heads (h_kv = 1).

* prefill: the plain formulation. Up-project c_kv with W_UK / W_UV to per-head keys and values and run
  causal softmax attention in XLA; write every prompt token's latent entry into the paged cache.
* decode: the absorbed formulation. q_nope . (W_UK c_kv) == (W_UK^T q_nope) . c_kv, so each head's query
  becomes a 512-dim latent query; with its roped 64-dim part it is a 576-dim query against the latent
  cache, which is exactly FlashMLA's problem. The 512-dim latent output goes through W_UV afterwards.

Both formulations compute the same function; tests check both against HF transformers'
DeepseekV3Attention with shared weights.

SPMD (optional `mesh`): under `jax.jit` with the batch on the mesh axis "data" (the cache placed by
sharding.shard_cache, tokens and lengths as P("data"), weights replicated), the cache writes and the decode
kernel run per shard with no communication (jax_flashmla/sharding.py has the rules). Given a mesh, decode
also constrains the absorbed query to P("data", None, "model", None), so a "model" axis splits the heads of
the FlashMLA call (each device attends with h / |model| heads over its batch rows; XLA also splits the
per-head projections around it, slicing the replicated weights locally). The cost is at the output:
o_proj contracts over all heads, so the head split ends there with one collective across "model" per
layer and decode step. XLA picks it: either an all-gather of the attention output (b / |data|, s_q, h,
v_head_dim) before o_proj, or, as XLA:CPU does with jax 0.10, o_proj on each device's heads (its rows of
the weight) and an all-reduce of the partial sums (b / |data|, s_q, hidden). With |model| = 1 decode needs
no communication at all. Axes a mesh lacks count as size 1; other axes replicate everything.
Prefill is not constrained: XLA partitions it from its inputs (the batch split, no communication).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .api import flash_mla_with_kvcache
from .cache import PagedKVCache, ints_as_int32
from .constants import SUPPORTED_HEAD_DIM_V
from .indexer import LightningIndexer
from .rope import YarnScaling, apply_rope, mla_softmax_scale, rope_attention_factor, rope_inv_freq

# FlashMLA's decode kernel reads latent entries of exactly these sizes (constants.py mirrors the kernel).
_KERNEL_KV_LORA_RANK = SUPPORTED_HEAD_DIM_V  # 512: the value part of each key
_KERNEL_ROPE_DIM = 64  # 576 - 512

# Mesh axes of the SPMD layout (module docstring): the batch and the heads of the decode kernel's query.
BATCH_AXIS = "data"
HEAD_AXIS = "model"


def mesh_axis_size(mesh, axis: str) -> int:
    """Size of `axis` in `mesh`; 1 where the mesh lacks it (or there is no mesh)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(axis, 1))


def decode_query_sharding(mesh) -> jax.sharding.NamedSharding:
    """q (b, s_q, h, 576) of the FlashMLA call: batch over "data", heads over "model" (where the mesh has them)."""
    names = set(mesh.axis_names)
    spec = P(BATCH_AXIS if BATCH_AXIS in names else None, None, HEAD_AXIS if HEAD_AXIS in names else None, None)
    return NamedSharding(mesh, spec)


def _entry_dtype(cache: PagedKVCache):
    """The dtype of the decode's query and of the entries handed to cache.write: the pool's, or bfloat16 for an
    FP8 pool (write packs them)."""
    return jnp.bfloat16 if cache.is_fp8 else cache.pages.dtype


def _causal_positions(topk_positions, cache: PagedKVCache, s_q: int):
    """topk_positions (b, s_q, topk) with -1 where query s may not look: past its own position, seqlens + s."""
    topk_positions = jnp.asarray(topk_positions)
    batch = cache.block_table.shape[0]
    if (topk_positions.ndim != 3 or topk_positions.shape[:2] != (batch, s_q)
            or not jnp.issubdtype(topk_positions.dtype, jnp.integer)):
        raise TypeError(f"topk_positions must be integers of shape ({batch}, {s_q}, topk), got shape "
                        f"{tuple(topk_positions.shape)} and dtype {topk_positions.dtype}")
    topk_positions = ints_as_int32(topk_positions, -1, cache.capacity)
    return jnp.where(topk_positions <= _own_positions(cache, s_q)[:, :, None], topk_positions, -1)


def _own_positions(cache: PagedKVCache, s_q: int):
    """(b, s_q) int32: where decode writes its s_q new tokens, the last position each may see."""
    return jnp.clip(cache.seqlens, 0, cache.capacity)[:, None] + jnp.arange(s_q, dtype=jnp.int32)


def _index_key_dtype(cache: PagedKVCache, index_head_dim: int):
    """The dtype the cache keeps indexer keys in; a clear error where it keeps none or keys of another size."""
    if cache.index_pages is None:
        raise ValueError("MLAConfig.index_topk needs a cache that keeps indexer keys: PagedKVCache.create(..., "
                         f"index_head_dim={index_head_dim})")
    cache.check_index_pages()
    if cache.index_pages.shape[-1] != index_head_dim:
        raise ValueError(f"the cache keeps {cache.index_pages.shape[-1]}-dim indexer keys, the config's "
                         f"index_head_dim is {index_head_dim}")
    return cache.index_pages.dtype


def _positions_mask(positions, n_keys: int):
    """Chosen key positions (b, s, topk) int32, -1 for none -> (b, s, n_keys) bool, True at each chosen one."""
    b, s, _ = positions.shape
    rows = jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None]
    return jnp.zeros((b, s, n_keys), bool).at[(*rows, jnp.where(positions >= 0, positions, n_keys))].set(
        True, mode="drop")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Sizes of one MLA layer; the defaults are DeepSeek-V3's."""

    hidden_size: int = 7168
    num_heads: int = 128
    q_lora_rank: int | None = 1536  # None: a single full-rank q projection (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # DeepSeek's checkpoints pair rope dims as (2i, 2i+1)
    yarn: YarnScaling | None = dataclasses.field(default_factory=YarnScaling)  # None: plain RoPE, scale d**-0.5
    rms_norm_eps: float = 1e-6
    dtype: Any = jnp.float32  # compute dtype of activations
    param_dtype: Any = jnp.float32
    # DeepSeek-V3.2's lightning indexer (indexer.py): each query attends to the index_topk tokens it scores
    # highest. None: dense attention, no indexer (DeepSeek-V3).
    index_topk: int | None = None
    index_n_heads: int = 64
    index_head_dim: int = 128

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MLAConfig.{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"MLAConfig.q_lora_rank must be None or a positive int, got {self.q_lora_rank!r}")
        if not isinstance(self.qk_rope_head_dim, int) or self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be a positive even int, got {self.qk_rope_head_dim!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"MLAConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 1:  # theta ** (-2i/d) must fall with i; YaRN divides by log(theta)
            raise ValueError(f"MLAConfig.rope_theta must be > 1, got {self.rope_theta!r}")
        if self.index_topk is not None:
            if not isinstance(self.index_topk, int) or isinstance(self.index_topk, bool) or self.index_topk <= 0:
                raise ValueError(f"MLAConfig.index_topk must be None or a positive int, got {self.index_topk!r}")
            if self.q_lora_rank is None:
                raise ValueError("MLAConfig.index_topk needs q_lora_rank: the indexer's queries come from the query "
                                 "latent")
            if not isinstance(self.index_n_heads, int) or self.index_n_heads <= 0:
                raise ValueError(f"MLAConfig.index_n_heads must be a positive int, got {self.index_n_heads!r}")
            if not isinstance(self.index_head_dim, int) or self.index_head_dim < self.qk_rope_head_dim:
                raise ValueError(f"MLAConfig.index_head_dim must be an int of at least qk_rope_head_dim "
                                 f"({self.qk_rope_head_dim}), got {self.index_head_dim!r}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Size of one token's cache entry: normalised c_kv then roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return mla_softmax_scale(self.qk_head_dim, self.yarn)

    @property
    def supports_paged_decode(self) -> bool:
        return self.kv_lora_rank == _KERNEL_KV_LORA_RANK and self.qk_rope_head_dim == _KERNEL_ROPE_DIM

    def check_paged_decode(self) -> None:
        if not self.supports_paged_decode:
            raise ValueError(
                "paged decode through FlashMLA needs kv_lora_rank=512 and qk_rope_head_dim=64 (576-dim latent "
                f"cache entries); this config has kv_lora_rank={self.kv_lora_rank}, "
                f"qk_rope_head_dim={self.qk_rope_head_dim} (prefill without a cache works for any size)"
            )


class RMSNorm(nnx.Module):
    """DeepSeek's RMSNorm: normalise in float32, cast back, then scale by the learned weight."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek-V3 MLA. Parameter names follow DeepSeek's checkpoints (kernels are (in, out)).

    mesh: optional jax.sharding.Mesh (static, kept in the graphdef); decode then splits the FlashMLA call's
    heads over its "model" axis (module docstring). None: no sharding constraint, single-device behaviour.
    """

    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        c = config
        heads_split = mesh_axis_size(mesh, HEAD_AXIS)
        if c.num_heads % heads_split:
            raise ValueError(f"num_heads ({c.num_heads}) must divide evenly over the mesh axis {HEAD_AXIS!r} "
                             f"({heads_split} devices)")
        self.mesh = mesh

        def linear(d_in, d_out):
            return nnx.Linear(d_in, d_out, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

        heads_qk = c.num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = linear(c.hidden_size, heads_qk)
        else:
            self.q_a_proj = linear(c.hidden_size, c.q_lora_rank)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=c.rms_norm_eps, param_dtype=c.param_dtype)
            self.q_b_proj = linear(c.q_lora_rank, heads_qk)
        self.kv_a_proj_with_mqa = linear(c.hidden_size, c.latent_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=c.rms_norm_eps, param_dtype=c.param_dtype)
        self.kv_b_proj = linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = linear(c.num_heads * c.v_head_dim, c.hidden_size)
        if c.index_topk is not None:
            self.indexer = LightningIndexer(
                hidden_size=c.hidden_size, q_lora_rank=c.q_lora_rank, n_heads=c.index_n_heads,
                head_dim=c.index_head_dim, rope_head_dim=c.qk_rope_head_dim, rope_theta=c.rope_theta, yarn=c.yarn,
                dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

    # --- shared pieces ---------------------------------------------------------------------------------

    def _rope(self, x, positions):
        # The tables are trace-time numpy constants (cheap), kept off the module so its state is params only.
        c = self.config
        inv_freq = rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, c.yarn)
        return apply_rope(x, positions, inv_freq, rope_attention_factor(c.yarn), c.rope_interleave)

    def _queries(self, x, positions):
        """x (b, s, hidden) -> q_nope (b, s, h, nope), roped q_pe (b, s, h, rope), and the low-rank query
        latent q_lora (b, s, q_lora_rank) the indexer reads (None without q_lora_rank)."""
        c = self.config
        if c.q_lora_rank is None:
            q, q_lora = self.q_proj(x), None
        else:
            q_lora = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_lora)
        q = q.reshape(*x.shape[:2], c.num_heads, c.qk_head_dim)
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        return q_nope, self._rope(q_pe, positions), q_lora

    def _latents(self, x, positions):
        """x (b, s, hidden) -> normalised c_kv (b, s, kv_lora_rank), roped k_pe (b, s, rope)."""
        c = self.config
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., : c.kv_lora_rank])
        k_pe = self._rope(kv[..., c.kv_lora_rank :][:, :, None, :], positions)[:, :, 0, :]  # one shared "head"
        return c_kv, k_pe

    @staticmethod
    def _cache_entries(c_kv, k_pe, dtype):
        """One latent cache entry per token, (b, s, 1, 576): [normalised c_kv | roped k_pe], one shared KV head."""
        return jnp.concatenate([c_kv, k_pe], axis=-1)[:, :, None, :].astype(dtype)

    def _up_projections(self):
        """W_UK (r, h, nope) and W_UV (r, h, v) from kv_b_proj, in the compute dtype."""
        c = self.config
        w = self.kv_b_proj.kernel[...].astype(c.dtype)
        w = w.reshape(c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        return w[..., : c.qk_nope_head_dim], w[..., c.qk_nope_head_dim :]

    def _output(self, o):
        """o (b, s, h, v) -> (b, s, hidden)."""
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    # --- prefill -----------------------------------------------------------------------------------------

    def prefill(
        self,
        x: jax.Array,
        lengths: jax.Array | None = None,
        cache: PagedKVCache | None = None,
        *,
        layer: int = 0,
    ) -> tuple[jax.Array, PagedKVCache | None]:
        """Causal self-attention over fresh sequences, optionally filling the paged cache.

        x (b, s, hidden): right-padded prompts; lengths (b,) int32 true lengths (default: all s), clipped to
        [0, s]. An empty prompt (0) writes nothing; its rows are padding like any row past a length.
        Tokens sit at positions 0..s-1: the sequences must be empty in `cache` (seqlens 0).
        With an indexer (MLAConfig.index_topk) each query attends only to the index_topk visible keys its indexer
        scores highest, and the indexer keys are written beside the latent entries. With a cache the indexer
        scores the keys as decode reads them back, rounded to the cache's index dtype; without one, in the compute
        dtype (so the picks can differ where the two dtypes differ).
        Writes each valid token's latent entry into layer `layer` of `cache` at positions seqlens + j
        but does not advance seqlens (all layers share them: the caller advances once, by `lengths`).
        Returns (out (b, s, hidden) -- rows past a prompt's length are padding, cache or None).
        """
        c = self.config
        b, s, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q_nope, q_pe, q_lora = self._queries(x, positions)
        c_kv, k_pe = self._latents(x, positions)

        w_uk, w_uv = self._up_projections()
        k_nope = jnp.einsum("bkr,rhn->bkhn", c_kv, w_uk)
        v = jnp.einsum("bkr,rhv->bkhv", c_kv, w_uv)
        scores = jnp.einsum("bqhn,bkhn->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bqhp,bkp->bhqk", q_pe, k_pe, preferred_element_type=jnp.float32)
        scores *= c.softmax_scale

        key_pos = jnp.arange(s)
        visible = key_pos[None, :] <= key_pos[:, None]  # causal (q, k)
        if lengths is not None:
            lengths = jnp.clip(lengths, 0, s)
            # Key 0 stays visible to an empty prompt's (padding) rows too: no row without a key, so no NaN.
            visible = visible[None] & (key_pos[None, None, :] < jnp.maximum(lengths, 1)[:, None, None])  # (b, q, k)
        else:
            visible = jnp.broadcast_to(visible[None], (b, s, s))
        if c.index_topk is not None:  # DeepSeek-V3.2: each query keeps the index_topk keys its indexer scores highest
            index_keys = self.indexer.keys(x, positions)
            if cache is not None:  # what decode would read back: the keys in the cache's dtype
                index_keys = index_keys.astype(_index_key_dtype(cache, c.index_head_dim))
            chosen = self.indexer.select(x, q_lora, positions, index_keys, visible, c.index_topk)
            visible &= _positions_mask(chosen, s)
        scores = jnp.where(visible[:, None], scores, -jnp.inf)  # key 0 is always visible: no empty rows
        probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
        out = self._output(jnp.einsum("bhqk,bkhv->bqhv", probs, v))

        if cache is not None:
            cache = cache.write(self._cache_entries(c_kv, k_pe, _entry_dtype(cache)), layer=layer, num_new=lengths)
            if c.index_topk is not None:
                cache = cache.write_index_keys(index_keys, layer=layer, num_new=lengths)
        return out, cache

    # --- decode ------------------------------------------------------------------------------------------

    def decode(
        self,
        x: jax.Array,
        cache: PagedKVCache,
        *,
        layer: int = 0,
        tile_scheduler_metadata: jax.Array | None = None,
        num_splits: jax.Array | None = None,
        topk_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, PagedKVCache]:
        """s_q new tokens per sequence (causal among themselves) against the paged latent cache.

        x (b, s_q, hidden) sits at positions cache.seqlens + 0..s_q-1. Their latent entries are written into
        layer `layer` first (seqlens is NOT advanced: the caller advances once after all layers), then
        attention runs through flash_mla_with_kvcache with cache_seqlens = seqlens + s_q.
        The caller keeps seqlens + s_q <= cache.capacity: entries past it are dropped, and the queries then
        attend to the cache's first `capacity` tokens without their own (finite, wrong outputs; no error).
        tile_scheduler_metadata / num_splits: get_mla_metadata(seqlens + s_q, s_q * num_heads, 1), computed
        once per step by the caller and shared by all layers (None: computed here).
        With a mesh, the FlashMLA query is constrained to P("data", None, "model", None) (class docstring).
        topk_positions: DeepSeek-V3.2's sparse attention: (b, s_q, topk) integer token positions each query
          attends to (its indexer's top-k picks; repeats count twice), instead of the whole sequence. Positions
          a query may not see (past its own, so causal still holds; negative; past the capacity) are dropped.
          It runs in XLA (no CUDA kernel yet), and is the only way to read an FP8 cache.
          With an indexer (MLAConfig.index_topk) the step's indexer keys are written beside the latent entries
          (the cache must keep them: PagedKVCache.create(index_head_dim=)), and unless topk_positions is given,
          the indexer picks them from every cached token each query may see.
        Returns (out (b, s_q, hidden), cache with this layer's entries written).
        """
        c = self.config
        c.check_paged_decode()
        if cache.is_fp8 and topk_positions is None and c.index_topk is None:
            raise ValueError("an FP8 cache is read by sparse attention only: pass topk_positions= or configure an "
                             "indexer (MLAConfig.index_topk); dense decode of an FP8 cache is not supported yet")
        b, s_q, _ = x.shape
        positions = cache.seqlens[:, None] + jnp.arange(s_q, dtype=jnp.int32)
        q_nope, q_pe, q_lora = self._queries(x, positions)
        c_kv, k_pe = self._latents(x, positions)
        kv_dtype = _entry_dtype(cache)
        cache = cache.write(self._cache_entries(c_kv, k_pe, kv_dtype), layer=layer)
        if c.index_topk is not None:
            index_dtype = _index_key_dtype(cache, c.index_head_dim)
            cache = cache.write_index_keys(self.indexer.keys(x, positions).astype(index_dtype), layer=layer)
            if topk_positions is None:
                topk_positions = self._indexer_topk(x, q_lora, positions, cache, layer)

        w_uk, w_uv = self._up_projections()
        q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w_uk)  # absorb W_UK into the query
        q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(kv_dtype)
        if self.mesh is not None:  # batch over "data", heads over "model": each device runs h / |model| heads
            q = jax.lax.with_sharding_constraint(q, decode_query_sharding(self.mesh))
        if topk_positions is None:
            out_latent, _ = flash_mla_with_kvcache(
                q,
                cache.pages,  # the stacked pool: the kernels read layer `layer` in place
                cache.block_table,
                cache.seqlens + s_q,
                c.kv_lora_rank,
                tile_scheduler_metadata=tile_scheduler_metadata,
                num_splits=num_splits,
                softmax_scale=c.softmax_scale,
                causal=True,
                layer=layer,
            )
        else:
            out_latent, _ = flash_mla_with_kvcache(
                q, cache.pages, None, None, c.kv_lora_rank, softmax_scale=c.softmax_scale,
                is_fp8_kvcache=cache.is_fp8, indices=cache.sparse_indices(_causal_positions(topk_positions, cache, s_q)),
                layer=layer)
        o = jnp.einsum("bshr,rhv->bshv", out_latent.astype(c.dtype), w_uv)  # absorb W_UV into the output
        return self._output(o), cache

    def _indexer_topk(self, x, q_lora, positions, cache: PagedKVCache, layer):
        """The indexer's top-k positions (b, s_q, index_topk) over the cached tokens each query may see: its own
        position and those before it, on valid pages (the keys of this step already written)."""
        keys, on_valid_page = cache.index_keys(layer)  # (b, capacity, d), (b, capacity)
        own = _own_positions(cache, x.shape[1])
        visible = (jnp.arange(cache.capacity)[None, None, :] <= own[:, :, None]) & on_valid_page[:, None, :]
        return self.indexer.select(x, q_lora, positions, keys, visible, self.config.index_topk)
