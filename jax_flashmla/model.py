"""A tiny DeepSeek-style decoder on MLA, and a generation loop over the paged latent cache.

Model: token embedding, N x [RMSNorm -> MLA -> residual, RMSNorm -> SwiGLU MLP -> residual], final RMSNorm,
LM head. Dense MLPs only (DeepSeek-V3's first layers; its MoE layers are beside the point here). Weights are
random from a seed.

Generation: one jitted prefill over the right-padded prompts, then one jitted decode step per new token.
The decode step donates the cache (XLA updates the page pool in place), computes FlashMLA's scheduler
metadata once from the new lengths and hands it to every layer.

Layers run as a Python loop, unrolled inside the jitted step, rather than under lax.scan: each layer then
writes its cache entries at a static layer index, which XLA lowers to an in-place update of the donated
pool, and reads its layer of the stacked pool in place (flash_mla_with_kvcache's layer=), and the layers
stay plain NNX submodules. The cost is compile time linear in depth, which is small for the few layers a
demo has; a deep model would stack the layer params and scan, carrying the pool (a traced layer index is
read in place too).

SPMD: build_model(config, mesh=...) gives a model whose generate() runs on that mesh: the batch is split
over the mesh axis "data" (the cache placed by sharding.shard_cache, tokens and lengths as P("data")), the
weights are replicated (P()), and each layer's FlashMLA call also splits its heads over "model" (at the cost
of one collective across "model" per layer and decode step, where o_proj joins the heads: see mla_module).
The jitted steps are the same functions; XLA partitions them from their inputs' shardings. Without a mesh
nothing is placed or constrained.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .api import get_mla_metadata
from .cache import PagedKVCache
from .constants import PAGE_SIZE
from .mla_module import BATCH_AXIS, MLAConfig, MultiHeadLatentAttention, RMSNorm, mesh_axis_size
from .rope import YarnScaling
from .sharding import shard_cache


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Model sizes. Attention sizes default to DeepSeek-V3's per-head dims; the rest is tiny."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    q_lora_rank: int | None = 128
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    yarn: YarnScaling | None = dataclasses.field(default_factory=YarnScaling)
    rms_norm_eps: float = 1e-6
    dtype: Any = jnp.float32  # activations and, by default, the KV cache
    param_dtype: Any = jnp.float32
    index_topk: int | None = None  # DeepSeek-V3.2's sparse attention through a lightning indexer (MLAConfig)
    index_n_heads: int = 64
    index_head_dim: int = 128

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        self.attention_config().check_paged_decode()  # also validates the attention sizes

    def attention_config(self) -> MLAConfig:
        return MLAConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            rope_theta=self.rope_theta,
            yarn=self.yarn,
            rms_norm_eps=self.rms_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            index_topk=self.index_topk,
            index_n_heads=self.index_n_heads,
            index_head_dim=self.index_head_dim,
        )


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        def linear(d_in, d_out):
            return nnx.Linear(
                d_in, d_out, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
            )

        self.gate_proj = linear(config.hidden_size, config.intermediate_size)
        self.up_proj = linear(config.hidden_size, config.intermediate_size)
        self.down_proj = linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None):
        norm = functools.partial(RMSNorm, eps=config.rms_norm_eps, param_dtype=config.param_dtype)
        self.input_layernorm = norm(config.hidden_size)
        self.self_attn = MultiHeadLatentAttention(config.attention_config(), rngs=rngs, mesh=mesh)
        self.post_attention_layernorm = norm(config.hidden_size)
        self.mlp = MLP(config, rngs=rngs)

    def _finish(self, h, attn_out):
        h = h + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))

    def prefill(self, h, lengths, cache, layer):
        attn_out, cache = self.self_attn.prefill(self.input_layernorm(h), lengths, cache, layer=layer)
        return self._finish(h, attn_out), cache

    def decode(self, h, cache, layer, tile_scheduler_metadata, num_splits):
        attn_out, cache = self.self_attn.decode(
            self.input_layernorm(h),
            cache,
            layer=layer,
            tile_scheduler_metadata=tile_scheduler_metadata,
            num_splits=num_splits,
        )
        return self._finish(h, attn_out), cache


class DeepSeekDecoder(nnx.Module):
    """Embedding, `num_layers` MLA decoder layers, final norm, LM head. Logits come out in float32.

    mesh: optional jax.sharding.Mesh that generate() runs on (module docstring); None: one device.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, mesh=mesh) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype)
        self.lm_head = nnx.Linear(
            config.hidden_size,
            config.vocab_size,
            use_bias=False,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def _logits(self, h):
        return self.lm_head(self.norm(h)).astype(jnp.float32)

    def new_cache(self, batch_size: int, max_seq_len: int, dtype=None, *, num_pages: int | None = None,
                  page_shards: int = 1) -> PagedKVCache:
        """An empty paged cache with one latent pool per layer (dtype defaults to the compute dtype), and with an
        indexer (index_topk), one pool of indexer keys per layer in the compute dtype. num_pages: page on demand
        from a pool of that many pages (PagedKVCache.create(on_demand=True)); page_shards as create takes it."""
        c = self.config
        if page_shards != 1 and num_pages is None:
            raise ValueError(f"page_shards={page_shards} is for pages on demand: pass num_pages= too")
        return PagedKVCache.create(
            num_pages=num_pages,
            on_demand=num_pages is not None,
            page_shards=page_shards,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            num_layers=c.num_layers,
            num_heads_k=1,
            head_dim=c.kv_lora_rank + c.qk_rope_head_dim,
            dtype=c.dtype if dtype is None else dtype,
            index_head_dim=None if c.index_topk is None else c.index_head_dim,
            index_dtype=None if c.index_topk is None else c.dtype,
        )

    def __call__(self, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Full causal forward without any cache: tokens (b, s) -> logits (b, s, vocab)."""
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h, _ = layer.prefill(h, lengths, None, 0)
        return self._logits(h)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: PagedKVCache):
        """Right-padded prompts (b, s) of `lengths` (clipped to [0, s]) into an empty cache.

        Returns (logits at each prompt's last token (b, vocab), cache advanced by lengths). An empty prompt
        (length 0) stores nothing, and its logits are those of its first (padding) token. An on-demand cache
        first reserves the prompts' pages; a row it cannot serve stores nothing, stays empty, and its logits mean
        nothing (call cache.reserve first to know which rows those are).
        """
        lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, tokens.shape[1])
        cache, stored = _reserve_pages(cache, lengths)
        h = self.embed_tokens(tokens)
        for index, layer in enumerate(self.layers):
            h, cache = layer.prefill(h, lengths, cache, index)
        last = jnp.take_along_axis(h, (jnp.maximum(lengths, 1) - 1)[:, None, None], axis=1)[:, 0]
        return self._logits(last), cache.advance(jnp.where(stored, lengths, 0))

    def decode(self, tokens: jax.Array, cache: PagedKVCache, tile_scheduler_metadata=None, num_splits=None, *,
               active: jax.Array | None = None):
        """tokens (b, s_q) appended to every sequence: returns (logits (b, s_q, vocab), cache advanced by s_q).

        The scheduler metadata depends only on the lengths, which all layers share: computed once here
        (unless given) and passed to each layer's FlashMLA call. An on-demand cache first reserves the new
        tokens' pages; a row it cannot serve does not advance, and its logits mean nothing.
        active: an optional (b,) bool mask of the rows that take this step (continuous batching); the others
        neither take pages nor advance, and their logits mean nothing.
        """
        s_q = tokens.shape[1]
        step = s_q
        if active is not None:
            active = jnp.asarray(active)
            if active.dtype != jnp.bool_ or active.shape != cache.seqlens.shape:
                raise TypeError(f"active must be a {tuple(cache.seqlens.shape)} bool mask, got shape "
                                f"{tuple(active.shape)} and dtype {np.dtype(active.dtype).name}")
            step = jnp.where(active, s_q, 0)
        cache, stored = _reserve_pages(cache, step)
        if tile_scheduler_metadata is None:
            tile_scheduler_metadata, num_splits = get_mla_metadata(
                cache.seqlens + s_q, s_q * self.config.num_heads, 1
            )
        h = self.embed_tokens(tokens)
        for index, layer in enumerate(self.layers):
            h, cache = layer.decode(h, cache, index, tile_scheduler_metadata, num_splits)
        return self._logits(h), cache.advance(jnp.where(stored, step, 0))


def _reserve_pages(cache: PagedKVCache, num_new) -> tuple[PagedKVCache, jax.Array]:
    """An on-demand cache's reserve; every row is served where the pages are fixed."""
    if not cache.is_on_demand:
        return cache, jnp.ones(cache.seqlens.shape, jnp.bool_)
    return cache.reserve(num_new)


@functools.partial(nnx.jit, static_argnums=0)
def _init_model(config: DecoderConfig, seed: jax.Array) -> DeepSeekDecoder:
    return DeepSeekDecoder(config, rngs=nnx.Rngs(jax.random.key(seed)))


def build_model(config: DecoderConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> DeepSeekDecoder:
    """Random weights from `seed`. Initialised under jit, compiled once per config: eager init would compile
    every op of every layer separately, which takes seconds on a small CPU.

    mesh: generate() then runs on it (module docstring); the weights are the same as without one. (The
    mesh is static structure, so it is grafted onto the weights rather than compiled into the init.)"""
    model = _init_model(config, jnp.asarray(seed, jnp.uint32))
    if mesh is None:
        return model
    structure = nnx.eval_shape(lambda: DeepSeekDecoder(config, rngs=nnx.Rngs(0), mesh=mesh))
    return nnx.merge(nnx.graphdef(structure), nnx.state(model))


# --- sampling and the jitted steps -------------------------------------------------------------------------


def sample_next(logits: jax.Array, key: jax.Array, top_k: int | None, temperature: float) -> jax.Array:
    """logits (b, vocab) -> tokens (b,) int32: greedy when top_k is None or 1, else top-k sampling."""
    if top_k is None or top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    values, indices = jax.lax.top_k(logits, top_k)
    choice = jax.random.categorical(key, values / temperature, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "temperature"), donate_argnames=("cache",))
def _prefill_step(graphdef, state, cache, tokens, lengths, key, *, top_k, temperature):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(tokens, lengths, cache)
    return sample_next(logits, key, top_k, temperature), logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "temperature"), donate_argnames=("cache",))
def _decode_step(graphdef, state, cache, tokens, key, *, top_k, temperature):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(tokens[:, None], cache)
    logits = logits[:, 0]
    return sample_next(logits, key, top_k, temperature), logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward(graphdef, state, tokens, lengths):
    return nnx.merge(graphdef, state)(tokens, lengths)


def _check_sampling(top_k, temperature, vocab_size):
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be None or in [1, vocab_size={vocab_size}], got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _batch_axes(mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: ("data",), or () for a mesh without that axis."""
    return (BATCH_AXIS,) if BATCH_AXIS in mesh.axis_names else ()


def check_batch_fits_mesh(batch_size: int, mesh) -> None:
    """A ValueError unless the batch divides evenly over the mesh's "data" axis."""
    shards = mesh_axis_size(mesh, BATCH_AXIS)
    if batch_size % shards:
        raise ValueError(f"the batch ({batch_size}) must divide evenly over the mesh axis {BATCH_AXIS!r} "
                         f"({shards} devices)")


def _replicated_state(model: DeepSeekDecoder):
    """(graphdef, state) with the weights replicated over the model's mesh (as they are without one)."""
    graphdef, state = nnx.split(model)
    if model.mesh is not None:
        state = jax.device_put(state, NamedSharding(model.mesh, P()))
    return graphdef, state


def make_decode_step(model: DeepSeekDecoder, *, top_k: int | None = None, temperature: float = 1.0):
    """The jitted decode step: step(cache, tokens (b,) int32, key) -> (next tokens (b,), logits (b, V), cache).

    `cache` is donated: the caller must drop its reference and keep the returned one. With a model mesh the
    weights are replicated over it; place the cache with sharding.shard_cache and the tokens as P("data").
    """
    _check_sampling(top_k, temperature, model.config.vocab_size)
    graphdef, state = _replicated_state(model)
    return functools.partial(_decode_step, graphdef, state, top_k=top_k, temperature=float(temperature))


# --- generation --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    prompt_lengths: np.ndarray  # (b,) int32
    tokens: np.ndarray  # (b, n) int32 generated tokens
    logits: np.ndarray  # (b, n, vocab) float32: the logits each generated token was drawn from
    prefill_seconds: float  # includes the prefill's compilation
    step_seconds: list[float]  # one per decode step; the first includes the step's compilation
    cache: PagedKVCache  # the final cache

    @property
    def steady_step_seconds(self) -> list[float]:
        """Decode-step latencies without the first (compiling) step."""
        return self.step_seconds[1:]

    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second over the steady decode steps (batch rows count separately)."""
        steady = self.steady_step_seconds
        return len(self.prompt_lengths) * len(steady) / sum(steady) if steady else float("nan")


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> (tokens (b, max_len) int32 right-padded with 0, lengths (b,) int32)."""
    if len(prompts) == 0:
        raise ValueError("need at least one prompt")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths.tolist()}")
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"prompt tokens must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return tokens, lengths


def check_pool_holds(num_pages: int, page_shards: int, final_lengths: np.ndarray) -> None:
    """An on-demand pool of num_pages, in page_shards stacks, holds every row at its final length (rows split
    evenly over the shards in order), or a ValueError says how many pages they need."""
    if (not isinstance(num_pages, (int, np.integer)) or isinstance(num_pages, bool) or num_pages < 1
            or num_pages % page_shards):
        raise ValueError(f"num_pages must be a positive int divisible by the {page_shards} batch shards, got "
                         f"{num_pages!r}")
    need = (-(-np.asarray(final_lengths) // PAGE_SIZE)).reshape(page_shards, -1).sum(axis=1)
    if need.max() > num_pages // page_shards:
        shards = "" if page_shards == 1 else (f" in the fullest of {page_shards} shards of "
                                              f"{num_pages // page_shards} pages each ({int(need.sum())} in all)")
        raise ValueError(f"num_pages={num_pages} is too few: the prompts and new tokens need {int(need.max())} pages "
                         f"of {PAGE_SIZE} tokens{shards}")


def generate(
    model: DeepSeekDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    top_k: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    cache_dtype=None,
    num_pages: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate `max_new_tokens` for each prompt: prefill, then max_new_tokens - 1 jitted decode steps.

    Greedy by default; top_k > 1 samples from the top_k logits at `temperature`. on_step(done, total) is
    called after the prefill (done=1) and after each decode step, for progress display.
    num_pages: page the cache on demand from a pool of that many pages (each row takes pages as it grows);
    it must hold every row's prompt and new tokens, checked before anything runs.
    On a model with a mesh the batch must divide evenly over its "data" axis; the cache, tokens and lengths
    are split over it and the weights replicated (module docstring). The results are the same either way.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config, mesh = model.config, model.mesh
    _check_sampling(top_k, temperature, config.vocab_size)
    tokens, lengths = pad_prompts(prompts, config.vocab_size)
    if mesh is not None:
        check_batch_fits_mesh(len(prompts), mesh)
    graphdef, state = _replicated_state(model)
    sampling = dict(top_k=top_k, temperature=float(temperature))
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)

    # The last generated token is never fed back, so it needs no slot.
    page_shards = mesh_axis_size(mesh, BATCH_AXIS)
    if num_pages is not None:
        check_pool_holds(num_pages, page_shards, lengths + max_new_tokens - 1)
    cache = model.new_cache(len(prompts), tokens.shape[1] + max_new_tokens - 1, cache_dtype, num_pages=num_pages,
                            page_shards=page_shards if num_pages is not None else 1)
    tokens_in, lengths_in = jnp.asarray(tokens), jnp.asarray(lengths)
    if mesh is not None:
        cache = shard_cache(cache, mesh, _batch_axes(mesh))
        rows = NamedSharding(mesh, P(_batch_axes(mesh)))
        tokens_in, lengths_in = jax.device_put(tokens_in, rows), jax.device_put(lengths_in, rows)
    start = time.perf_counter()
    next_tokens, logits, cache = _prefill_step(graphdef, state, cache, tokens_in, lengths_in, keys[0], **sampling)
    next_tokens.block_until_ready()
    prefill_seconds = time.perf_counter() - start
    generated, all_logits, step_seconds = [next_tokens], [logits], []
    if on_step:
        on_step(1, max_new_tokens)

    for step in range(1, max_new_tokens):
        start = time.perf_counter()
        next_tokens, logits, cache = _decode_step(graphdef, state, cache, next_tokens, keys[step], **sampling)
        next_tokens.block_until_ready()  # per-step latency is only meaningful if each step finishes
        step_seconds.append(time.perf_counter() - start)
        generated.append(next_tokens)
        all_logits.append(logits)
        if on_step:
            on_step(step + 1, max_new_tokens)

    return GenerationResult(
        prompt_lengths=lengths,
        tokens=np.stack([np.asarray(t) for t in generated], axis=1),
        logits=np.stack([np.asarray(x) for x in all_logits], axis=1),
        prefill_seconds=prefill_seconds,
        step_seconds=step_seconds,
        cache=cache,
    )


def recompute_logits(model: DeepSeekDecoder, prompts: Sequence[Sequence[int]], generated: np.ndarray) -> np.ndarray:
    """Logits for each generated token recomputed from scratch (no cache), aligned with GenerationResult.logits.

    Row i is run as prompt_i + generated_i[:-1] through the full causal forward; the logits at positions
    len(prompt_i) - 1 .. are the ones that produced generated_i.
    """
    n = generated.shape[1]
    full_prompts = [list(p) + [int(t) for t in generated[i, : n - 1]] for i, p in enumerate(prompts)]
    tokens, lengths = pad_prompts(full_prompts, model.config.vocab_size)
    graphdef, state = nnx.split(model)
    logits = np.asarray(_full_forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths)))
    starts = lengths - n  # each row holds len(prompt) + n - 1 tokens: this is its prompt's last position
    return np.stack([logits[i, s : s + n] for i, s in enumerate(starts)])
