"""JAX primitives for MLA decode: abstract evaluation, lowering per platform, and batching.

Two primitives, both internal (jax_flashmla.api is the public face):
  mla_metadata_p  cache_seqlens -> (tile_metadata, num_splits)      params: num_parts, split_overhead
  mla_decode_p    q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer
                  -> (out, lse, o_accum, lse_accum)                               params below
k_cache is one layer's pool (num_pages, 64, h_kv, d), or a stacked pool (num_layers, num_pages, 64, h_kv, d)
of which the decode reads layer `layer` (an int32 scalar operand, clamped into range: validation.clamp_layer;
0 for a one-layer pool). The kernels read that layer in place, whether the index is static or traced.
o_accum/lse_accum are the split-KV partials. They are results of the custom call so that XLA owns their memory
for as long as the kernels run (FFI scratch memory is released when the handler returns, before the kernels on
the stream are done); the public function drops them.

Lowering: the `cuda` platform gets the FFI custom calls when the extension is loaded and the process's GPUs
are Hopper (sm_90, what the kernels are built for); every other platform (and float32 inputs, which the
kernels do not take, and other GPU generations) lowers to the jnp specification in reference.py and
scheduler.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch  # apply_primitive: eager execution of a primitive, as JAX's own use it
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import PartitionSpec

from . import _extension, scheduler, validation
from .constants import BLOCK_M, DEFAULT_NUM_SMS, METADATA_ROW_INTS
from .reference import mla_decode_reference

# ----------------------------------------------------------------------------------------------------
# Scheduler metadata


_FOLDED = " (the batch as the primitive sees it: vmap folds its mapped axis into it)"

mla_metadata_p = Primitive("jax_flashmla_mla_metadata")
mla_metadata_p.multiple_results = True
mla_metadata_p.def_impl(functools.partial(dispatch.apply_primitive, mla_metadata_p))


@mla_metadata_p.def_abstract_eval
def _metadata_abstract_eval(cache_seqlens, *, num_parts, split_overhead):
    # The public functions checked their own shapes; a batching rule folds vmap's axis into the batch.
    validation.check_schedule_fits(cache_seqlens.shape[0], num_parts=num_parts, where=_FOLDED)
    scheduler.check_split_overhead(split_overhead)
    return (ShapedArray((num_parts, METADATA_ROW_INTS), jnp.int32),
            ShapedArray((cache_seqlens.shape[0] + 1,), jnp.int32))


def _metadata_reference(cache_seqlens, *, num_parts, split_overhead):
    return scheduler.schedule(cache_seqlens, num_parts, split_overhead)


_metadata_reference_lowering = mlir.lower_fun(_metadata_reference, multiple_results=True)
mlir.register_lowering(mla_metadata_p, _metadata_reference_lowering)


def _metadata_batch(args, dims, *, num_parts, split_overhead):
    (seqlens,), (dim,) = args, dims
    seqlens = jnp.moveaxis(seqlens, dim, 0)
    schedule_one = functools.partial(_metadata_reference, num_parts=num_parts, split_overhead=split_overhead)
    return jax.vmap(schedule_one)(seqlens), (0, 0)


batching.primitive_batchers[mla_metadata_p] = _metadata_batch


def device_num_sms(device) -> int:
    """SMs of a GPU device; an H100's count for devices that report none (CPU, TPU)."""
    return int(getattr(device, "core_count", None) or DEFAULT_NUM_SMS)


def bind_schedule(cache_seqlens, *, num_sms: int, num_heads_k: int, num_q_tokens_per_head_k: int):
    """The split-KV schedule sized to fill num_sms SMs: (tile_metadata, num_splits). get_mla_metadata and each
    shard of a partitioned decode (sharding.py) both go through here."""
    num_parts = scheduler.num_parts_for(num_sms, num_heads_k, num_q_tokens_per_head_k, BLOCK_M)
    return mla_metadata_p.bind(cache_seqlens, num_parts=num_parts,
                               split_overhead=scheduler.split_overhead_for(num_q_tokens_per_head_k))

# ----------------------------------------------------------------------------------------------------
# Decode


mla_decode_p = Primitive("jax_flashmla_mla_decode")
mla_decode_p.multiple_results = True
mla_decode_p.def_impl(functools.partial(dispatch.apply_primitive, mla_decode_p))


def accum_shapes(batch, num_parts, h_kv, q_rows, head_dim_v):
    """Split-KV scratch: the partials, one slot per possible split (at most b + num_parts of them)."""
    splits = batch + num_parts
    return (splits, h_kv, q_rows, head_dim_v), (splits, h_kv, q_rows)


ACCUM_DTYPES = (jnp.float32, jnp.float32)


def _accum_zeros(*args, mapped=()):
    """Scratch results with no defined content, as zeros that XLA drops once nothing reads them; `mapped`: leading
    dims (a batching rule's)."""
    return tuple(jnp.zeros((*mapped, *shape), dtype) for shape, dtype in zip(accum_shapes(*args), ACCUM_DTYPES))


def _split_like_q(q, dims):
    """Under Explicit mesh axes shardings are part of the types: out and lse split like q's batch (dim 0) and
    heads (dim 2); dims names, per result dim, the q dim it follows. None where q's type carries no split."""
    sharding = getattr(q, "sharding", None)
    spec = (tuple(sharding.spec) if sharding is not None else ()) + (None,) * q.ndim
    if not any(spec):
        return None
    return sharding.update(spec=PartitionSpec(*(None if d is None else spec[d] for d in dims)))


@mla_decode_p.def_abstract_eval
def _decode_abstract_eval(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer, *, head_dim_v,
                          softmax_scale, causal, poison_outputs):
    del cache_seqlens, num_splits, layer, softmax_scale, causal, poison_outputs
    batch, s_q, h_q, _ = q.shape
    validation.check_schedule_fits(batch, block_table.shape[1], tile_metadata.shape[0], where=_FOLDED)
    h_kv = k_cache.shape[-2]
    scratch = accum_shapes(batch, tile_metadata.shape[0], h_kv, s_q * h_q // h_kv, head_dim_v)
    return (ShapedArray((batch, s_q, h_q, head_dim_v), q.dtype, sharding=_split_like_q(q, (0, None, 2, None))),
            ShapedArray((batch, h_q, s_q), jnp.float32, sharding=_split_like_q(q, (0, 2, None))),
            *(ShapedArray(shape, dtype) for shape, dtype in zip(scratch, ACCUM_DTYPES)))


def _decode_reference(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer, *, head_dim_v,
                      softmax_scale, causal, poison_outputs):
    del num_splits, poison_outputs
    if k_cache.ndim == 5:
        k_cache = jax.lax.dynamic_index_in_dim(k_cache, validation.clamp_layer(layer, k_cache.shape[0]), 0,
                                               keepdims=False)
    out, lse = mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v=head_dim_v,
                                    softmax_scale=softmax_scale, causal=causal)
    batch, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[-2]
    return out, lse, *_accum_zeros(batch, tile_metadata.shape[0], h_kv, s_q * h_q // h_kv, head_dim_v)


_decode_reference_lowering = mlir.lower_fun(_decode_reference, multiple_results=True)
mlir.register_lowering(mla_decode_p, _decode_reference_lowering)


def _decode_batch(args, dims, **params):
    """vmap folds the mapped axis into the batch: one launch over n*b sequences.

    A mapped page pool (e.g. one per layer) is concatenated along its page axis and the block tables are
    rebased onto it; ids that were invalid stay invalid. A stacked pool that is mapped, or read at a mapped
    layer, is first cut to each element's layer (a gather: those cases copy). The schedule is recomputed for
    the folded batch.
    """
    q, k_cache, block_table, cache_seqlens, tile_metadata, _, layer = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def front(x, d):
        return jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)

    q, block_table, cache_seqlens = (front(x, d) for x, d in zip((q, block_table, cache_seqlens),
                                                                 (dims[0], dims[2], dims[3])))
    pool_dim = dims[1]
    stacked = k_cache.ndim - (pool_dim is not None) == 5
    if stacked and (pool_dim is not None or dims[6] is not None):
        stacks, layers = front(k_cache, pool_dim), front(layer, dims[6])
        k_cache = jax.vmap(lambda pools, i: jax.lax.dynamic_index_in_dim(
            pools, validation.clamp_layer(i, pools.shape[0]), 0, keepdims=False))(stacks, layers)
        pool_dim, layer = 0, jnp.int32(0)
    elif not stacked:
        layer = jnp.int32(0)  # a one-layer pool: every index clamps to layer 0
    if pool_dim is not None:
        k_cache = jnp.moveaxis(k_cache, pool_dim, 0)
        pages_per_pool = k_cache.shape[1]
        valid = (block_table >= 0) & (block_table < pages_per_pool)
        offsets = (jnp.arange(size, dtype=jnp.int32) * pages_per_pool)[:, None, None]
        block_table = jnp.where(valid, block_table + offsets, -1)
        k_cache = k_cache.reshape(size * pages_per_pool, *k_cache.shape[2:])  # pools end to end

    batch = q.shape[1]
    flat_seqlens = cache_seqlens.reshape(size * batch)
    num_parts = tile_metadata.shape[-2]
    q_rows = q.shape[2] * q.shape[3] // k_cache.shape[-2]  # s_q * h_q / h_kv, as get_mla_metadata was given
    flat_md, flat_splits = mla_metadata_p.bind(flat_seqlens, num_parts=num_parts,
                                               split_overhead=scheduler.split_overhead_for(q_rows))
    out, lse, o_accum, *_ = mla_decode_p.bind(
        q.reshape(size * batch, *q.shape[2:]), k_cache, block_table.reshape(size * batch, -1), flat_seqlens,
        flat_md, flat_splits, layer, **params)
    out = out.reshape(size, batch, *out.shape[1:])
    lse = lse.reshape(size, batch, *lse.shape[1:])
    # Scratch of a folded launch has no per-element meaning; hand back zeros of the mapped shape.
    scratch = _accum_zeros(batch, num_parts, o_accum.shape[1], o_accum.shape[2], o_accum.shape[3], mapped=(size,))
    return (out, lse, *scratch), (0,) * 4


batching.primitive_batchers[mla_decode_p] = _decode_batch

# ----------------------------------------------------------------------------------------------------
# CUDA lowerings: the FFI custom calls


def _register_cuda_lowerings():
    metadata_ffi = jax.ffi.ffi_lowering(_extension.METADATA_TARGET)
    decode_ffi = jax.ffi.ffi_lowering(_extension.DECODE_TARGET)

    # On GPUs the kernels were not built for (not sm_90), the cuda platform gets the reference too: a custom
    # call there would fail to launch.
    def metadata_rule(ctx, cache_seqlens, *, num_parts, split_overhead):
        if not _extension.kernels_available():
            return _metadata_reference_lowering(ctx, cache_seqlens, num_parts=num_parts,
                                                split_overhead=split_overhead)
        return metadata_ffi(ctx, cache_seqlens, split_overhead=np.int32(split_overhead))

    def decode_rule(ctx, *operands, head_dim_v, softmax_scale, causal, poison_outputs):
        params = dict(head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal,
                      poison_outputs=poison_outputs)
        if ctx.avals_in[0].dtype == jnp.float32 or not _extension.kernels_available():  # bf16/fp16 on sm_90 only
            return _decode_reference_lowering(ctx, *operands, **params)
        return decode_ffi(ctx, *operands, softmax_scale=np.float32(softmax_scale), causal=bool(causal),
                          poison_outputs=bool(poison_outputs))

    mlir.register_lowering(mla_metadata_p, metadata_rule, platform="cuda")
    mlir.register_lowering(mla_decode_p, decode_rule, platform="cuda")


if _extension.kernels_built():
    _register_cuda_lowerings()
