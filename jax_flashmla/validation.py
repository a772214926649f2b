"""Trace-time checks: bad input gets a ValueError/TypeError naming the argument, what it got and what was
expected, before any kernel sees it. Runtime values (lengths, page ids) are the kernels' to survive."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .constants import (MAX_GRID_YZ, MAX_PAGES_PER_SEQ, MAX_QUERY_ROWS, MAX_SCHEDULE_PARTS, MAX_SCHEDULED_BATCH,
                        METADATA_ROW_INTS, PAGE_SIZE, SUPPORTED_HEAD_DIM_V, SUPPORTED_HEAD_DIMS)
from .fp8_cache import FP8_TOKEN_BYTES, is_packed_fp8
from .fp8_cache import HEAD_DIM as FP8_HEAD_DIM
from .scheduler import max_scheduled_blocks

ATTENTION_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)  # float32 runs the reference on every platform


def _describe(x) -> str:
    return f"shape {tuple(x.shape)} and dtype {np.dtype(x.dtype).name}"


def _require_rank(name, x, rank, layout):
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got {_describe(x)}")


def _require_int32(name, x):
    if np.dtype(x.dtype) != np.int32:
        raise TypeError(f"{name} must be int32, got {_describe(x)}")


def host_ints_as_int32(name, x):
    """A NumPy integer array wider than int32 (np.arange gives int64) converts when its values fit int32; values
    outside int32 are refused here, where jnp.asarray (with x64 off) would wrap them, turning a huge page id or
    token index into a valid-looking one. Anything else passes as it is."""
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.integer) or x.dtype == np.int32:
        return x
    info = np.iinfo(np.int32)
    if x.size and (x.min() < info.min or x.max() > info.max):
        raise ValueError(f"{name} must be int32, got a NumPy {_describe(x)} with values in [{x.min()}, {x.max()}], "
                         f"outside int32's range")
    return x.astype(np.int32)


def check_seqlens(cache_seqlens, batch: int | None = None):
    _require_rank("cache_seqlens", cache_seqlens, 1, "(batch,)")
    _require_int32("cache_seqlens", cache_seqlens)
    if cache_seqlens.shape[0] == 0:
        raise ValueError("cache_seqlens must hold at least one sequence, got shape (0,)")
    if batch is not None and cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have shape ({batch},) to match q's batch, got {_describe(cache_seqlens)}")
    check_schedule_fits(cache_seqlens.shape[0])


def check_schedule_fits(batch: int, max_pages_per_seq: int | None = None, num_parts: int | None = None,
                        where: str = ""):
    """The split-KV scheduler counts a batch's blocks in int32 (scheduler.py): it takes at most
    MAX_SCHEDULED_BATCH sequences and MAX_SCHEDULE_PARTS parts, and the decode a block table no wider than the
    schedule counts. `where` says how the batch came about (vmap folds its axis into the batch)."""
    if batch > MAX_SCHEDULED_BATCH:
        raise ValueError(f"the split-KV scheduler counts in int32 and takes at most {MAX_SCHEDULED_BATCH} sequences, "
                         f"got a batch of {batch}{where}")
    if num_parts is not None and not 1 <= num_parts <= MAX_SCHEDULE_PARTS:
        raise ValueError(f"the split-KV schedule must have 1 to {MAX_SCHEDULE_PARTS} parts (rows of "
                         f"tile_scheduler_metadata), got {num_parts}{where}")
    if max_pages_per_seq is not None and max_pages_per_seq > max_scheduled_blocks(batch):
        raise ValueError(f"block_table's max_pages_per_seq must be at most {max_scheduled_blocks(batch)} for a batch "
                         f"of {batch}{where}: the split-KV scheduler counts the whole batch's pages in int32 (up to "
                         f"2**30), so it clips longer sequences; got max_pages_per_seq {max_pages_per_seq}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_metadata_args(num_q_tokens_per_head_k, num_heads_k, num_sms=None, num_heads_q=None):
    for name, value in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k), ("num_heads_k", num_heads_k)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive Python int, got {value!r}")
    if num_heads_q is not None:
        # FlashMLA takes h_q too (it needs it for sparse attention only); when given it must fit the other two.
        if not _is_int(num_heads_q) or num_heads_q < 1 or num_heads_q % num_heads_k:
            raise ValueError(f"num_heads_q must be None or a positive multiple of num_heads_k ({num_heads_k}), "
                             f"got {num_heads_q!r}")
        if num_q_tokens_per_head_k % (num_heads_q // num_heads_k):
            raise ValueError(f"num_q_tokens_per_head_k must be s_q * num_heads_q // num_heads_k, a multiple of "
                             f"{num_heads_q // num_heads_k}, got {num_q_tokens_per_head_k} with num_heads_q "
                             f"{num_heads_q} and num_heads_k {num_heads_k}")
    if num_sms is not None and (not _is_int(num_sms) or not 1 <= num_sms <= MAX_SCHEDULE_PARTS):
        raise ValueError(f"num_sms must be None (the GPU's count) or a Python int in [1, {MAX_SCHEDULE_PARTS}], "
                         f"got {num_sms!r}")


def check_fp8_flag(is_fp8_kvcache) -> bool:
    """FlashMLA's is_fp8_kvcache: a Python or NumPy bool or int (or None, false), known at trace time."""
    if is_fp8_kvcache is None:
        return False
    if not isinstance(is_fp8_kvcache, (bool, np.bool_, int, np.integer)):
        raise TypeError(f"is_fp8_kvcache must be a Python bool known at trace time, got {_short(is_fp8_kvcache)}")
    return bool(is_fp8_kvcache)


def check_topk(topk):
    if not _is_int(topk) or topk < 1:
        raise ValueError(f"topk must be None (dense attention) or a positive Python int, got {topk!r}")


def check_dense_call(is_fp8_kvcache: bool, **sparse_only):
    """A call without indices is dense: the sparse-only arguments must be None, and the cache not FP8."""
    for name, value in sparse_only.items():
        if value is not None:
            raise ValueError(f"{name}={_short(value)} is an argument of sparse attention: pass indices= as well, "
                             f"or leave {name} None")
    if is_fp8_kvcache:
        raise NotImplementedError("is_fp8_kvcache=True without indices: the FP8 KV cache (DeepSeek-V3.2's layout, "
                                  "jax_flashmla.quantize_kv_cache) is read by sparse attention (indices=) only; "
                                  "dense decode of an FP8 cache is not supported yet")


def _short(value) -> str:
    return _describe(value) if hasattr(value, "shape") and hasattr(value, "dtype") else repr(value)


def check_attn_sink(attn_sink, h_q: int):
    """Returns attn_sink as an array: (h_q,) floats, one logit per query head."""
    try:
        attn_sink = jnp.asarray(attn_sink)
    except TypeError as error:
        raise TypeError(f"attn_sink must be a float array of shape ({h_q},), got {attn_sink!r}") from error
    if not jnp.issubdtype(attn_sink.dtype, jnp.floating):
        raise TypeError(f"attn_sink must be a float array of shape ({h_q},) (one logit per query head), got "
                        f"{_describe(attn_sink)}")
    if attn_sink.shape != (h_q,):
        raise ValueError(f"attn_sink must have shape ({h_q},) (one logit per query head), got "
                         f"{_describe(attn_sink)}")
    return attn_sink


def check_layer(k_cache, layer, name: str = "k_cache"):
    """A rank-5 k_cache is a stacked pool (num_layers, num_pages, 64, h_kv, d) and needs the layer to read:
    a Python int in range, or a traced integer scalar, which clamp_layer clamps into range. `name`: the pool's
    argument name in messages."""
    if k_cache.ndim != 5:
        if layer is not None:
            raise ValueError(f"layer={layer!r} is only for a stacked {name} of rank 5 (num_layers, num_pages, "
                             f"{PAGE_SIZE}, h_kv, head_dim), got {name} with {_describe(k_cache)}")
        return
    num_layers = k_cache.shape[0]
    if layer is None:
        raise ValueError(f"a {name} of rank 5 is a stacked pool (num_layers, num_pages, {PAGE_SIZE}, h_kv, "
                         f"head_dim) and needs layer=, got {name} with {_describe(k_cache)} and no layer")
    if isinstance(layer, (bool, np.bool_)):
        raise TypeError(f"layer must be an int, got {layer!r}")
    if isinstance(layer, (int, np.integer)):
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer must lie in [0, {num_layers}) for {name} with {_describe(k_cache)}, "
                             f"got {layer}")
        return
    layer_shape, layer_dtype = np.shape(layer), getattr(layer, "dtype", None)
    if layer_shape != () or layer_dtype is None or not jnp.issubdtype(layer_dtype, jnp.integer):
        raise TypeError(f"layer must be a Python int or an integer scalar array, got {layer!r}")


def clamp_layer(layer, num_layers: int):
    """A layer index as the kernels read it: clamped into [0, num_layers), a negative one to 0 (it does not wrap
    around as x[i] would). The decode's reference path and cache writes use it, so all agree with the kernels."""
    return jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1)


def _check_query(q, layout="(batch, s_q, h_q, head_dim)"):
    _require_rank("q", q, len(layout.split(",")), layout)
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"q must be bfloat16 or float16 (float32 runs the reference only), got {_describe(q)}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q's head dim must be one of {SUPPORTED_HEAD_DIMS}, got {_describe(q)}")
    if 0 in q.shape:
        raise ValueError(f"q must have non-empty axes {layout}, got {_describe(q)}")


def _check_head_dim_v(head_dim_v, head_dim: int):
    if not _is_int(head_dim_v) or head_dim_v > head_dim or head_dim_v != SUPPORTED_HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {SUPPORTED_HEAD_DIM_V} (and at most q's head dim {head_dim}), "
                         f"got {head_dim_v!r}")


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_metadata, num_splits, layer=None):
    _check_query(q)
    batch, s_q, h_q, head_dim = q.shape

    if k_cache.ndim != 5:
        _require_rank("k_cache", k_cache, 4, f"(num_pages, {PAGE_SIZE}, h_kv, head_dim) or rank 5 (num_layers, "
                      f"num_pages, {PAGE_SIZE}, h_kv, head_dim) with layer=")
    check_layer(k_cache, layer)
    num_pages, page_size, h_kv, k_dim = k_cache.shape[-4:]
    if k_cache.dtype != q.dtype:
        hint = (" (it holds packed FP8 tokens, which only sparse attention reads: pass indices= and "
                "is_fp8_kvcache=True)" if is_packed_fp8(k_cache) else "")
        raise TypeError(f"k_cache must have q's dtype {np.dtype(q.dtype).name}{hint}, got {_describe(k_cache)}")
    if page_size != PAGE_SIZE:
        raise ValueError(f"k_cache pages must hold {PAGE_SIZE} tokens (axis {k_cache.ndim - 3}), got "
                         f"{_describe(k_cache)}")
    if k_dim != head_dim:
        raise ValueError(f"k_cache's head dim must equal q's ({head_dim}), got {_describe(k_cache)}")
    if num_pages == 0 or h_kv == 0 or k_cache.shape[0] == 0:
        raise ValueError(f"k_cache must have at least one layer, page and KV head, got {_describe(k_cache)}")
    if h_q % h_kv:
        raise ValueError(f"q's h_q ({h_q}) must be a multiple of k_cache's h_kv ({h_kv})")
    # Launch grids: KV heads are a y dimension, and the combine's z dimension covers a head group's query rows.
    if h_kv > MAX_GRID_YZ or s_q * h_q // h_kv > MAX_QUERY_ROWS:
        raise ValueError(f"k_cache's h_kv must be at most {MAX_GRID_YZ} and s_q * h_q / h_kv at most {MAX_QUERY_ROWS} "
                         f"(CUDA grid limits), got q with {_describe(q)} and h_kv {h_kv}")

    _check_head_dim_v(head_dim_v, head_dim)

    _require_rank("block_table", block_table, 2, "(batch, max_pages_per_seq)")
    _require_int32("block_table", block_table)
    if block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(f"block_table must have shape ({batch}, max_pages_per_seq >= 1) to match q's batch, "
                         f"got {_describe(block_table)}")
    if block_table.shape[1] > MAX_PAGES_PER_SEQ:
        raise ValueError(f"block_table's max_pages_per_seq must be at most 2**24 ({MAX_PAGES_PER_SEQ}): the kernels "
                         f"keep token positions (64 a page) in int32; got {_describe(block_table)}")
    check_seqlens(cache_seqlens, batch)
    check_schedule_fits(batch, block_table.shape[1])

    if (tile_metadata is None) != (num_splits is None):
        raise ValueError("tile_scheduler_metadata and num_splits go together: pass both (from get_mla_metadata) "
                         "or neither")
    if tile_metadata is not None:
        _require_rank("tile_scheduler_metadata", tile_metadata, 2, f"(num_parts, {METADATA_ROW_INTS})")
        _require_int32("tile_scheduler_metadata", tile_metadata)
        if tile_metadata.shape[1] != METADATA_ROW_INTS or tile_metadata.shape[0] == 0:
            raise ValueError(f"tile_scheduler_metadata must have shape (num_parts >= 1, {METADATA_ROW_INTS}), "
                             f"got {_describe(tile_metadata)}")
        _require_rank("num_splits", num_splits, 1, "(batch + 1,)")
        _require_int32("num_splits", num_splits)
        if num_splits.shape[0] != batch + 1:
            raise ValueError(f"num_splits must have shape ({batch + 1},) (batch + 1), got {_describe(num_splits)}")
        check_schedule_fits(batch, num_parts=tile_metadata.shape[0])


def check_softmax_scale(softmax_scale):
    if isinstance(softmax_scale, (bool, np.bool_)):
        raise TypeError(f"softmax_scale must be a Python float, got the bool {softmax_scale!r}: FlashMLA's order is "
                        f"(..., num_splits, softmax_scale, causal, is_fp8_kvcache, indices), so a causal flag "
                        f"passed right after num_splits lands here; pass causal= by keyword")
    if not isinstance(softmax_scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"softmax_scale must be a Python float known at trace time, got {type(softmax_scale).__name__}")
    if not np.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be finite and positive, got {softmax_scale!r}")


def _check_sparse_cache(name, cache, q, is_fp8_kvcache: bool):
    """A cache sparse attention gathers from: (num_pages, page_size, h_kv, d) of q's dtype, or packed FP8."""
    num_pages, page_size, h_kv, width = cache.shape[-4:]
    head_dim = q.shape[-1]
    if is_fp8_kvcache:
        if not is_packed_fp8(cache):
            raise TypeError(f"{name} must hold packed FP8 tokens with is_fp8_kvcache=True: float8_e4m3fn or uint8, "
                            f"{FP8_TOKEN_BYTES} bytes a token (jax_flashmla.quantize_kv_cache packs them), got "
                            f"{_describe(cache)}")
        if head_dim != FP8_HEAD_DIM:
            raise ValueError(f"q's head dim must be {FP8_HEAD_DIM} with an FP8 cache, got {_describe(q)}")
    else:
        if cache.dtype != q.dtype:
            hint = " (it holds packed FP8 tokens: pass is_fp8_kvcache=True)" if is_packed_fp8(cache) else ""
            raise TypeError(f"{name} must have q's dtype {np.dtype(q.dtype).name}{hint}, got {_describe(cache)}")
        if width != head_dim:
            raise ValueError(f"{name}'s head dim must equal q's ({head_dim}), got {_describe(cache)}")
    if 0 in (num_pages, page_size, h_kv) or cache.shape[0] == 0:
        raise ValueError(f"{name} must have at least one page, token slot and KV head, got {_describe(cache)}")
    if q.shape[2] % h_kv:
        raise ValueError(f"q's h_q ({q.shape[2]}) must be a multiple of {name}'s h_kv ({h_kv})")


def _check_indices(name, indices, leading: tuple, layout: str):
    _require_rank(name, indices, len(leading) + 1, layout)
    _require_int32(name, indices)
    if indices.shape[:-1] != leading or indices.shape[-1] == 0:
        raise ValueError(f"{name} must have shape {layout} = ({', '.join(map(str, leading))}, topk >= 1), got "
                         f"{_describe(indices)}")


def _check_topk_length(name, topk_length, rows: int, what: str):
    if topk_length is None:
        return
    _require_rank(name, topk_length, 1, f"({what},)")
    _require_int32(name, topk_length)
    if topk_length.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},) (one count per {what}), got {_describe(topk_length)}")


def check_sparse_decode_args(q, k_cache, indices, topk_length, extra_k_cache, extra_indices, extra_topk_length,
                             head_dim_v, is_fp8_kvcache: bool, causal: bool, layer=None):
    _check_query(q)
    batch, s_q, _, head_dim = q.shape
    if causal:
        raise ValueError("causal must be False with sparse attention (indices=): the indices choose each query's keys")
    _check_head_dim_v(head_dim_v, head_dim)
    if k_cache.ndim != 5:
        _require_rank("k_cache", k_cache, 4, "(num_pages, page_size, h_kv, head_dim) or rank 5 (num_layers, "
                      "num_pages, page_size, h_kv, head_dim) with layer=")
    check_layer(k_cache, layer)
    _check_sparse_cache("k_cache", k_cache, q, is_fp8_kvcache)
    _check_indices("indices", indices, (batch, s_q), "(batch, s_q, topk)")
    _check_topk_length("topk_length", topk_length, batch, "sequence")
    if (extra_k_cache is None) != (extra_indices is None):
        raise ValueError("extra_k_cache and extra_indices_in_kvcache go together: pass both or neither")
    if extra_k_cache is None:
        if extra_topk_length is not None:
            raise ValueError("extra_topk_length counts entries of extra_indices_in_kvcache: pass that (and "
                             "extra_k_cache) as well, or leave extra_topk_length None")
        return
    _require_rank("extra_k_cache", extra_k_cache, 4, "(num_pages, page_size, h_kv, head_dim)")
    _check_sparse_cache("extra_k_cache", extra_k_cache, q, is_fp8_kvcache)
    if extra_k_cache.shape[2] != k_cache.shape[-2]:
        raise ValueError(f"extra_k_cache must have k_cache's h_kv ({k_cache.shape[-2]}), got {_describe(extra_k_cache)}")
    _check_indices("extra_indices_in_kvcache", extra_indices, (batch, s_q), "(batch, s_q, extra_topk)")
    _check_topk_length("extra_topk_length", extra_topk_length, batch, "sequence")


def check_sparse_prefill_args(q, kv, indices, head_dim_v, topk_length):
    _check_query(q, "(s_q, h_q, head_dim)")
    s_q, h_q, head_dim = q.shape
    _check_head_dim_v(head_dim_v, head_dim)
    _require_rank("kv", kv, 3, "(s_kv, h_kv, head_dim)")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv must have q's dtype {np.dtype(q.dtype).name}, got {_describe(kv)}")
    if kv.shape[2] != head_dim or 0 in kv.shape:
        raise ValueError(f"kv must have shape (s_kv >= 1, h_kv >= 1, {head_dim}) (q's head dim), got {_describe(kv)}")
    if h_q % kv.shape[1]:
        raise ValueError(f"q's h_q ({h_q}) must be a multiple of kv's h_kv ({kv.shape[1]})")
    _check_indices("indices", indices, (s_q, kv.shape[1]), "(s_q, h_kv, topk)")
    _check_topk_length("topk_length", topk_length, s_q, "query token")
