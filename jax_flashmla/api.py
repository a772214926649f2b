"""The public functions, named and shaped like FlashMLA's so PyTorch code ports line for line."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import sharding, validation
from .constants import DEFAULT_NUM_SMS
from .primitives import bind_schedule, device_num_sms
from .reference import apply_attention_sink
from .sparse_xla import compute_dtype, sparse_decode, sparse_prefill


@functools.lru_cache(maxsize=None)
def _default_num_sms() -> int:
    """SMs of the first GPU if JAX sees one (the schedule's shape depends on it), else an H100's count."""
    try:
        for device in jax.devices("gpu"):
            return device_num_sms(device)
    except RuntimeError:
        pass
    return DEFAULT_NUM_SMS


def get_mla_metadata(cache_seqlens=None, num_q_tokens_per_head_k: int | None = None, num_heads_k: int | None = None,
                     num_heads_q: int | None = None, is_fp8_kvcache: bool = False, topk: int | None = None, *,
                     num_sms: int | None = None):
    """Split-KV schedule for one decode step; compute once per step and pass to every layer.

    The arguments are FlashMLA's, in its order, so either of its call forms ports unchanged:
    `get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv[, h_q, is_fp8_kvcache, topk])`, or its newest
    `get_mla_metadata()` with no argument, which returns (None, None): `flash_mla_with_kvcache` then computes
    the schedule inside each call (one small kernel a layer), where the first form computes it once a step.

    Args:
      cache_seqlens: (b,) int32 KV lengths (including this step's new tokens).
      num_q_tokens_per_head_k: s_q * h_q // h_kv.
      num_heads_k: h_kv.
      num_heads_q: h_q, optional; when given it must be a multiple of h_kv that divides the query tokens.
      is_fp8_kvcache, topk: FlashMLA's FP8 cache and sparse attention. With topk (a positive int) the call is
        for sparse attention, which needs no schedule here: it returns (None, None). An FP8 cache without topk
        (dense decode of an FP8 cache) raises a NotImplementedError.
      num_sms: SMs to fill, 1 to 65535; defaults to the first GPU's count (132 when no GPU is visible).
    The schedule charges each split the fixed cost of the kernel that num_q_tokens_per_head_k selects (2 blocks
    for the narrow kernel's head groups of at most 32 query rows, 5 for wider ones: scheduler.split_overhead_for).
    Returns:
      (tile_scheduler_metadata (num_parts, 8) int32, num_splits (b + 1,) int32), or (None, None) when called
      with no argument or with topk.
    """
    is_fp8_kvcache = validation.check_fp8_flag(is_fp8_kvcache)
    cache_seqlens = _optional_array(cache_seqlens, "cache_seqlens")
    if topk is not None:
        validation.check_topk(topk)
        if cache_seqlens is not None:  # checked as the dense form checks them, though sparse reads none of them
            validation.check_seqlens(cache_seqlens)
            validation.check_metadata_args(num_q_tokens_per_head_k, num_heads_k, num_sms, num_heads_q)
        return None, None
    validation.check_dense_call(is_fp8_kvcache)
    given = {"cache_seqlens": cache_seqlens, "num_q_tokens_per_head_k": num_q_tokens_per_head_k,
             "num_heads_k": num_heads_k}
    if all(value is None for value in given.values()) and num_heads_q is None and num_sms is None:
        return None, None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise TypeError(f"get_mla_metadata needs cache_seqlens, num_q_tokens_per_head_k and num_heads_k together "
                        f"(or no argument at all, to schedule inside flash_mla_with_kvcache); missing "
                        f"{', '.join(missing)}")
    validation.check_seqlens(cache_seqlens)
    validation.check_metadata_args(num_q_tokens_per_head_k, num_heads_k, num_sms, num_heads_q)
    # The schedule covers the whole batch: under Explicit mesh axes the lengths are gathered first.
    return bind_schedule(sharding.gathered(cache_seqlens), num_sms=_default_num_sms() if num_sms is None else num_sms,
                         num_heads_k=num_heads_k, num_q_tokens_per_head_k=num_q_tokens_per_head_k)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int, tile_scheduler_metadata=None,
                           num_splits=None, softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices=None, attn_sink=None, extra_k_cache=None,
                           extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None, *,
                           layer=None, poison_outputs: bool = False):
    """Multi-head latent attention decode over a paged KV cache.

    Args:
      q: (b, s_q, h_q, d) bfloat16 or float16 (float32 runs the reference); d is 576 or 512.
      k_cache: (num_pages, 64, h_kv, d), q's dtype. The values are the first head_dim_v dims of each key.
        Or a stacked pool of all layers, (num_layers, num_pages, 64, h_kv, d), with `layer` naming the one to
        read: the kernels then read that layer in place. (Passing `pool[layer]` costs no copy either with
        jax 0.11 on an H100, whose dynamic-slice fusion hands the kernel an offset into the pool; `layer`
        does not rely on that.)
      block_table: (b, max_pages_per_seq) int32 page ids, max_pages_per_seq <= 2**24 and
        b * (max_pages_per_seq + 5) <= 2**30 (the scheduler counts the batch's pages in int32); ids outside
        [0, num_pages) are ignored.
      cache_seqlens: (b,) int32 KV lengths, clipped to [0, 64 * max_pages_per_seq].
      head_dim_v: value dim, 512.
      tile_scheduler_metadata, num_splits: from get_mla_metadata; computed here when num_splits is None
        (FlashMLA's newest interface passes its scheduling object with num_splits=None). Under a mesh that splits
        the batch or the heads each shard computes its own schedule and these are ignored.
      softmax_scale: defaults to d ** -0.5.
      causal: with s_q > 1, query token i sees keys [0, L - s_q + i].
      is_fp8_kvcache: k_cache (and extra_k_cache) hold DeepSeek-V3.2's packed FP8 tokens, (..., 656) float8_e4m3fn
        or uint8 from `quantize_kv_cache`; with sparse attention only (dense decode of an FP8 cache raises a
        NotImplementedError).
      indices: (b, s_q, topk) int32 turns on sparse attention (DeepSeek-V3.2): query token s of sequence i
        attends to the tokens indices[i, s, :] of k_cache, each page * page_size + slot (FlashMLA's
        indices_in_kvcache; `PagedKVCache.sparse_indices` converts token positions), shared by all KV heads.
        An index outside [0, num_pages * page_size) (FlashMLA's -1) is ignored, a repeated one counts twice.
        block_table, cache_seqlens and the schedule are then not read (they may be None), causal must be False,
        and any page size is taken. It runs in XLA on every platform: there is no CUDA kernel for it yet.
      topk_length: optional (b,) int32: sequence i reads only indices[i, :, :topk_length[i]].
      extra_k_cache, extra_indices_in_kvcache, extra_topk_length: a second cache (same format, any page size)
        whose indexed tokens are attended to as well, as if appended to each query's topk.
      attn_sink: optional (h_q,) float logits of a sink token per query head, which takes softmax weight but
        contributes no value: out is multiplied by exp(lse) / (exp(lse) + exp(attn_sink)) (FlashMLA's
        definition); -inf changes nothing, +inf zeroes the head's output, NaN makes it NaN, and a query that saw
        no key stays 0. lse is returned without the sink.
      layer: with a stacked k_cache, the layer to read: a Python int in [0, num_layers), or a traced integer
        scalar (e.g. under lax.scan over layers), clamped into [0, num_layers) (a negative index reads layer
        0; it does not wrap around as pool[i] would). Either way the kernels read the layer in place.
      poison_outputs: testing aid; the CUDA path of the dense decode fills every output with NaN before the
        kernels run.
    Returns:
      out (b, s_q, h_q, head_dim_v) in q's dtype, lse (b, h_q, s_q) float32 (natural log; +inf where a
      query sees no key, whose out is 0).

    Inside jax.jit over a Mesh, NamedSharding'd arguments split on batch (q, block_table, cache_seqlens, and
    k_cache's page axis) and on heads (q) partition with no communication; jax_flashmla/sharding.py lists
    the supported layouts and the block_table precondition.
    """
    # First, so that FlashMLA README's positional `causal, is_fp8_kvcache, indices` after num_splits (which lands
    # causal in softmax_scale) is named as such, not as an FP8 request.
    if softmax_scale is not None:
        validation.check_softmax_scale(softmax_scale)
    is_fp8_kvcache = validation.check_fp8_flag(is_fp8_kvcache)
    if indices is not None:
        return _sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices_in_kvcache,
                              extra_topk_length, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal,
                              is_fp8_kvcache=is_fp8_kvcache, attn_sink=attn_sink, layer=layer)
    validation.check_dense_call(is_fp8_kvcache, extra_k_cache=extra_k_cache,
                                extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
                                extra_topk_length=extra_topk_length)
    for name, value in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if value is None:
            raise TypeError(f"{name} is required (only sparse attention, with indices=, leaves it out)")
    q, k_cache = jnp.asarray(q), jnp.asarray(k_cache)
    block_table, cache_seqlens = (_optional_array(x, name) for name, x in
                                  (("block_table", block_table), ("cache_seqlens", cache_seqlens)))
    if num_splits is None:
        # FlashMLA's newest interface passes its scheduling object with num_splits=None and schedules on the first
        # call: metadata without num_splits is scheduled here too (the given metadata is not read).
        tile_scheduler_metadata = None
    # Lists convert as the other arguments do; arrays (and abstract ones, under eval_shape) pass as they are.
    tile_scheduler_metadata, num_splits = (x if x is None or hasattr(x, "shape") else jnp.asarray(x)
                                           for x in (tile_scheduler_metadata, num_splits))
    validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                 num_splits, layer)
    _, s_q, h_q, head_dim = q.shape
    h_kv = k_cache.shape[-2]
    if tile_scheduler_metadata is None:
        tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    if attn_sink is not None:
        attn_sink = validation.check_attn_sink(attn_sink, h_q)
    out, lse = sharding.decode(
        q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
        jnp.asarray(0 if layer is None else layer, jnp.int32), head_dim_v=int(head_dim_v),
        softmax_scale=float(softmax_scale), causal=bool(causal) and s_q > 1, poison_outputs=bool(poison_outputs))
    if attn_sink is not None:
        # An elementwise epilogue in XLA (fused, and partitioned like out): the kernels need not know.
        out = apply_attention_sink(out, lse, sharding.split_like_heads(attn_sink, lse))
    return out, lse


def _optional_array(x, name=None):
    """x as a jax array, None as None; a named integer argument goes through host_ints_as_int32 first."""
    if x is None:
        return None
    return jnp.asarray(x if name is None else validation.host_ints_as_int32(name, x))


def _sparse_decode(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length, *,
                   head_dim_v, softmax_scale, causal, is_fp8_kvcache, attn_sink, layer):
    """flash_mla_with_kvcache with indices: sparse decode in XLA (sparse_xla.py)."""
    q, k_cache, extra_k_cache = jnp.asarray(q), jnp.asarray(k_cache), _optional_array(extra_k_cache)
    indices, topk_length, extra_indices, extra_topk_length = (_optional_array(x, name) for name, x in (
        ("indices", indices), ("topk_length", topk_length), ("extra_indices_in_kvcache", extra_indices),
        ("extra_topk_length", extra_topk_length)))
    validation.check_sparse_decode_args(q, k_cache, indices, topk_length, extra_k_cache, extra_indices,
                                        extra_topk_length, head_dim_v, is_fp8_kvcache, bool(causal), layer)
    if attn_sink is not None:
        attn_sink = validation.check_attn_sink(attn_sink, q.shape[2])
    if k_cache.ndim == 5:
        k_cache = jax.lax.dynamic_index_in_dim(k_cache, validation.clamp_layer(layer, k_cache.shape[0]),
                                               keepdims=False)
    decode = functools.partial(sparse_decode, head_dim_v=int(head_dim_v), softmax_scale=float(
        q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale), dtype=compute_dtype(q.dtype, is_fp8_kvcache))
    # out and lse split as q's batch and heads, under Explicit mesh axes too.
    out, lse = sharding.under_auto_axes(
        lambda q, k, i, t, ek, ei, et: decode(q, k, i, topk_length=t, extra_k_cache=ek, extra_indices=ei,
                                              extra_topk_length=et),
        q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
        out_specs=lambda spec: (P(spec[0], None, spec[2], None), P(spec[0], spec[2], None)))
    if attn_sink is not None:
        out = apply_attention_sink(out, lse, sharding.split_like_heads(attn_sink, lse))
    return out, lse


def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float, d_v: int = 512, attn_sink=None, topk_length=None):
    """DeepSeek-V3.2 sparse prefill, FlashMLA's flash_mla_sparse_fwd: each query token attends to the tokens its
    indices name. It runs in XLA on every platform (sparse_xla.py; reference.sparse_prefill_reference specifies
    it): no CUDA kernel yet.

    Args:
      q: (s_q, h_q, d) bfloat16 or float16 (float32 too); d is 576 or 512.
      kv: (s_kv, h_kv, d), q's dtype; the values are the first d_v dims of each key.
      indices: (s_q, h_kv, topk) int32, token ids into kv for each query token and KV head; ids outside
        [0, s_kv) (FlashMLA's -1) are ignored, a repeated id counts twice. Query head h reads KV head
        h // (h_q // h_kv).
      sm_scale: the softmax scale (FlashMLA has no default here either).
      d_v: value dim, 512.
      attn_sink: optional (h_q,) float sink logits, as in flash_mla_with_kvcache (out only).
      topk_length: optional (s_q,) int32: query token s reads only indices[s, :, :topk_length[s]].
    Returns:
      out (s_q, h_q, d_v) in q's dtype; max_logits (s_q, h_q) float32, the largest scaled score (-inf for a
      query that saw no key); lse (s_q, h_q) float32, natural log (+inf for such a query, whose out is 0).
    """
    validation.check_softmax_scale(sm_scale)
    q, kv = jnp.asarray(q), jnp.asarray(kv)
    indices, topk_length = _optional_array(indices, "indices"), _optional_array(topk_length, "topk_length")
    validation.check_sparse_prefill_args(q, kv, indices, d_v, topk_length)
    if attn_sink is not None:
        attn_sink = validation.check_attn_sink(attn_sink, q.shape[1])
    prefill = functools.partial(sparse_prefill, head_dim_v=int(d_v), softmax_scale=float(sm_scale))
    # Results split as q's tokens and heads, under Explicit mesh axes too.
    out, max_logits, lse = sharding.under_auto_axes(
        lambda q, kv, i, t: prefill(q, kv, i, topk_length=t), q, kv, indices, topk_length,
        out_specs=lambda spec: (P(spec[0], spec[1], None), P(spec[0], spec[1]), P(spec[0], spec[1])))
    if attn_sink is not None:
        out = apply_attention_sink(out[None], lse.T[None], sharding.split_like_heads(attn_sink, lse.T[None]))[0]
    return out, max_logits, lse
