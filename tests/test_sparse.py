"""Sparse attention (DeepSeek-V3.2): flash_mla_with_kvcache with indices, and flash_mla_sparse_fwd, against the
float64 oracles, with hostile indices (-1, negative, past the cache, repeated), NaN in every token no valid
index names, an FP8 cache, and the transformations a model puts them under."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import reference, sparse_xla

from oracle import sparse_decode_oracle, sparse_prefill_oracle
from tolerances import assert_lse_close, assert_out_close

SINKS = np.array([0.5, -np.inf, np.inf, -2.0, 3.0, 0.0, 1.0, -1.0])


def hostile_indices(rng, shape, num_tokens, readable):
    """int32 indices: mostly readable tokens (repeats included), plus -1, other negatives and ids past the cache."""
    indices = rng.choice(readable, size=shape).astype(np.int64)
    junk = rng.random(shape)
    indices[junk < 0.1] = -1
    indices[(junk >= 0.1) & (junk < 0.15)] = rng.integers(-(2**31), -1, size=shape)[(junk >= 0.1) & (junk < 0.15)]
    indices[(junk >= 0.15) & (junk < 0.2)] = num_tokens + rng.integers(0, 1000, size=shape)[(junk >= 0.15) & (junk < 0.2)]
    indices[..., -1] = 2**31 - 1
    indices[..., -2] = num_tokens  # one past the last token: a gather would clamp it onto the last one
    return indices.astype(np.int32)


def sparse_cache(rng, num_pages, page_size, h_kv, dtype, readable_fraction=0.6):
    """A cache whose tokens outside `readable` are NaN, and the readable token ids (never token 0, which ignored
    indices would read if the gather did not mask them)."""
    num_tokens = num_pages * page_size
    readable = rng.choice(np.arange(1, num_tokens), size=int(readable_fraction * num_tokens), replace=False)
    cache = (rng.standard_normal((num_tokens, h_kv, 576)) / 10).astype(np.float32)
    poisoned = np.ones(num_tokens, bool)
    poisoned[readable] = False
    cache[poisoned] = np.nan
    cache = np.asarray(jnp.asarray(cache, dtype), np.float32)  # values the dtype holds
    return cache.reshape(num_pages, page_size, h_kv, 576), readable


def decode_problem(rng, *, batch=3, s_q=2, h_q=8, h_kv=1, topk=40, extra=True, dtype=jnp.bfloat16):
    q = np.asarray(jnp.asarray(np.clip(rng.standard_normal((batch, s_q, h_q, 576)) / 10, -1, 1), dtype), np.float32)
    cache, readable = sparse_cache(rng, 5, 64, h_kv, dtype)
    indices = hostile_indices(rng, (batch, s_q, topk), cache.shape[0] * 64, readable)
    topk_length = np.array([topk + 7, 0, 11][:batch], np.int32)  # past topk reads all; 0 reads nothing
    scopes = [(cache, indices, topk_length)]
    if extra:  # a second cache with another page size, its own topk and lengths
        extra_cache, extra_readable = sparse_cache(rng, 3, 16, h_kv, dtype)
        extra_indices = hostile_indices(rng, (batch, s_q, 24), 48, extra_readable)
        scopes.append((extra_cache, extra_indices, np.array([24, 0, 5][:batch], np.int32)))
    return q, scopes


def call_decode(q, scopes, dtype, *, attn_sink=None, fp8=False, **kwargs):
    cache = lambda c: jfm.quantize_kv_cache(c) if fp8 else jnp.asarray(c, dtype)
    (k_cache, indices, topk_length), *extra = scopes
    extra_args = {}
    if extra:
        (extra_cache, extra_indices, extra_length), = extra
        extra_args = dict(extra_k_cache=cache(extra_cache), extra_indices_in_kvcache=extra_indices,
                          extra_topk_length=extra_length)
    return jfm.flash_mla_with_kvcache(jnp.asarray(q, dtype), cache(k_cache), None, None, 512, indices=indices,
                                      topk_length=topk_length, attn_sink=attn_sink, is_fp8_kvcache=fp8,
                                      **extra_args, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("h_kv", [1, 2])
def test_sparse_decode_matches_float64_oracle(dtype, h_kv, rng_seed):
    rng = np.random.default_rng([rng_seed, h_kv])
    q, scopes = decode_problem(rng, h_kv=h_kv, dtype=dtype)
    scale = 0.8 * 576**-0.5
    out, lse = jax.jit(functools.partial(call_decode, dtype=dtype, softmax_scale=scale), static_argnums=())(q, scopes)
    assert out.dtype == dtype and out.shape == (3, 2, 8, 512) and lse.shape == (3, 8, 2)
    want_out, want_lse = sparse_decode_oracle(q, [(np.nan_to_num(c, nan=1e30), i, t) for c, i, t in scopes], 512, scale)
    assert_out_close(out, want_out, dtype)
    assert_lse_close(lse, want_lse)
    # Sequence 1 reads nothing from the cache (topk_length 0) nor from the extra cache: out 0, lse +inf.
    assert np.all(np.asarray(out[1], np.float32) == 0) and np.all(np.isposinf(np.asarray(lse[1])))


@pytest.mark.parametrize("keys_per_step", [7, 16, 1000])
def test_chunked_xla_path_equals_the_specification(keys_per_step, rng_seed):
    """sparse_xla (what the API runs) over chunks that do not divide topk, against reference.py's one-piece
    float32 specification, and both against the float64 oracle; 16-bit products against the oracle too."""
    rng = np.random.default_rng([rng_seed, keys_per_step])
    q, scopes = decode_problem(rng, h_kv=2, dtype=jnp.float32)
    (cache, indices, lengths), (extra, extra_indices, extra_lengths) = scopes
    kwargs = dict(head_dim_v=512, softmax_scale=0.07, topk_length=lengths, extra_k_cache=jnp.asarray(extra),
                  extra_indices=extra_indices, extra_topk_length=extra_lengths)
    spec = jax.jit(functools.partial(reference.sparse_decode_reference, **kwargs))(q, jnp.asarray(cache), indices)
    chunked = jax.jit(functools.partial(sparse_xla.sparse_decode, dtype=jnp.float32, keys_per_step=keys_per_step,
                                        **kwargs))(q, jnp.asarray(cache), indices)
    want_out, want_lse = sparse_decode_oracle(q, [(np.nan_to_num(c, nan=1e30), i, t) for c, i, t in scopes], 512, 0.07)
    for got in (spec, chunked):
        assert_out_close(got[0], want_out, jnp.float32)
        assert_lse_close(got[1], want_lse)
    np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(spec[0]), rtol=1e-5, atol=1e-7)
    half = functools.partial(sparse_xla.sparse_decode, dtype=jnp.bfloat16, keys_per_step=keys_per_step,
                             **{**kwargs, "extra_k_cache": jnp.asarray(extra, jnp.bfloat16)})
    out, lse = jax.jit(half)(jnp.asarray(q, jnp.bfloat16), jnp.asarray(cache, jnp.bfloat16), indices)
    assert_out_close(out, want_out, jnp.bfloat16)
    assert_lse_close(lse, want_lse)
    # The prefill, per KV head, likewise.
    kv = cache.reshape(-1, 2, 576)
    prefill_q = q[0].reshape(4, 4, 576)  # 4 query tokens, 4 heads over 2 KV heads
    prefill_indices = hostile_indices(rng, (4, 2, 30), kv.shape[0], np.flatnonzero(~np.isnan(kv[:, 0, 0])))
    prefill_args = dict(head_dim_v=512, softmax_scale=0.07, topk_length=np.array([30, 0, 9, 17], np.int32))
    spec = reference.sparse_prefill_reference(prefill_q, jnp.asarray(kv), prefill_indices, **prefill_args)
    chunked = sparse_xla.sparse_prefill(prefill_q, jnp.asarray(kv), prefill_indices, keys_per_step=keys_per_step,
                                        **prefill_args)
    want = sparse_prefill_oracle(prefill_q, np.nan_to_num(kv, nan=1e30), prefill_indices, 512, 0.07,
                                 prefill_args["topk_length"])
    for got in (spec, chunked):
        assert_out_close(got[0], want[0], jnp.float32)
        assert_lse_close(got[2], want[2])
        np.testing.assert_array_equal(np.isneginf(np.asarray(got[1])), np.isneginf(want[1]))


@pytest.mark.parametrize("keys_per_step", [1, 2, 64])
def test_an_infinite_score_gives_what_the_specification_gives_at_any_chunk_size(keys_per_step, rng_seed):
    """A key with +inf where q is positive scores +inf: out NaN and lse +inf in the specification, whichever chunk
    the key falls in (a rescale of exp(inf - inf) would make lse NaN)."""
    rng = np.random.default_rng(rng_seed)
    q = jnp.asarray(np.abs(rng.standard_normal((1, 1, 2, 576))), jnp.float32)
    cache = rng.standard_normal((1, 64, 1, 576)).astype(np.float32)
    cache[0, 3, 0, 0] = np.inf
    indices = np.array([[[3, 5, 9, 11]]], np.int32)  # the infinite key first: later chunks meet a max of +inf
    kwargs = dict(head_dim_v=512, softmax_scale=0.05)
    spec = reference.sparse_decode_reference(q, jnp.asarray(cache), indices, **kwargs)
    chunked = sparse_xla.sparse_decode(q, jnp.asarray(cache), indices, dtype=jnp.float32,
                                       keys_per_step=keys_per_step, **kwargs)
    assert np.isnan(np.asarray(spec[0])).all() and np.isposinf(np.asarray(spec[1])).all()
    for g, w in zip(chunked, spec):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_sparse_decode_attention_sink(rng_seed):
    rng = np.random.default_rng(rng_seed)
    q, scopes = decode_problem(rng)
    out, lse = jax.jit(lambda q, s, sink: call_decode(q, s, jnp.bfloat16, attn_sink=sink))(q, scopes, SINKS)
    safe = [(np.nan_to_num(c, nan=1e30), i, t) for c, i, t in scopes]
    with np.errstate(over="ignore"):
        want_out, want_lse = sparse_decode_oracle(q, safe, 512, 576**-0.5, attn_sink=SINKS)
    assert_out_close(out, want_out, jnp.bfloat16)
    assert_lse_close(lse, want_lse)  # without the sink
    assert np.all(np.asarray(out[:, :, 2], np.float32) == 0)  # a sink of +inf


def test_sparse_decode_fp8_cache(rng_seed):
    """An FP8 cache decodes as its unpacked bf16 cache does, bit for bit (unpacking is exact), from uint8 or
    float8 storage."""
    rng = np.random.default_rng(rng_seed)
    q, scopes = decode_problem(rng)
    scopes = [(np.nan_to_num(c, nan=0.0), i, t) for c, i, t in scopes]  # a NaN would make its whole tile NaN
    got = jax.jit(lambda q, s: call_decode(q, s, jnp.bfloat16, fp8=True))(q, scopes)
    unpacked = [(np.asarray(jfm.dequantize_kv_cache(jfm.quantize_kv_cache(c)), np.float32), i, t) for c, i, t in scopes]
    want = call_decode(q, unpacked, jnp.bfloat16)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    want_out, want_lse = sparse_decode_oracle(q, unpacked, 512, 576**-0.5)
    assert_out_close(got[0], want_out, jnp.bfloat16)
    assert_lse_close(got[1], want_lse)
    (k_cache, indices, topk_length), _ = scopes
    as_bytes = jfm.quantize_kv_cache(k_cache).view(jnp.uint8)
    from_bytes = jfm.flash_mla_with_kvcache(jnp.asarray(q, jnp.bfloat16), as_bytes, None, None, 512,
                                            is_fp8_kvcache=True, indices=indices, topk_length=topk_length)
    want = call_decode(q, unpacked[:1], jnp.bfloat16)
    for g, w in zip(from_bytes, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_nan_in_a_token_read_makes_that_query_nan(rng_seed):
    """A NaN in a token a valid index names propagates to that query's out and lse (it is not mistaken for a query
    that saw no key), in the decode and the prefill; the other queries are untouched."""
    rng = np.random.default_rng(rng_seed)
    q, scopes = decode_problem(rng, extra=False, dtype=jnp.float32)
    (cache, indices, topk_length), = scopes
    cache = np.nan_to_num(cache, nan=0.0)
    indices = indices.copy()
    indices[0, 1, 0] = 7  # sequence 0 reads all its entries; query token 1 now reads token 7
    indices[0, 0] = -1
    indices[0, 0, 3] = 9  # query token 0 reads token 9 only
    cache.reshape(-1, 576)[7, 100] = np.nan
    args = (jnp.asarray(q), jnp.asarray(cache), None, None, 512)
    out, lse = jfm.flash_mla_with_kvcache(*args, indices=indices, topk_length=topk_length)
    assert np.isnan(np.asarray(out[0, 1])).all() and np.isnan(np.asarray(lse[0, :, 1])).all()
    assert np.isfinite(np.asarray(out[0, 0])).all() and np.isfinite(np.asarray(lse[0, :, 0])).all()
    kv = jnp.asarray(cache.reshape(-1, 1, 576))
    out, max_logits, lse = jfm.flash_mla_sparse_fwd(jnp.asarray(q[0]), kv, indices[0][:, None, :], 0.05)
    assert np.isnan(np.asarray(out[1])).all() and np.isnan(np.asarray(lse[1])).all()
    assert np.isnan(np.asarray(max_logits[1])).all() and np.isfinite(np.asarray(out[0])).all()


def test_sparse_decode_reads_a_stacked_pool_in_place_of_a_layer(rng_seed):
    rng = np.random.default_rng(rng_seed)
    q, scopes = decode_problem(rng, extra=False)
    (cache, indices, topk_length), = scopes
    pools = jnp.stack([jnp.asarray(cache, jnp.bfloat16) * (layer + 1) for layer in range(3)])
    args = (jnp.asarray(q, jnp.bfloat16), pools, None, None, 512)
    decode = lambda layer: jfm.flash_mla_with_kvcache(*args, indices=indices, topk_length=topk_length, layer=layer)
    for layer, reads in ((1, 1), (2, 2), (jnp.int32(7), 2), (jnp.int32(-1), 0)):  # traced layers clamp
        got = decode(layer) if isinstance(layer, int) else jax.jit(decode)(layer)
        want = jfm.flash_mla_with_kvcache(*args[:1], pools[reads], *args[2:], indices=indices, topk_length=topk_length)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_sparse_decode_under_vmap_and_grad(rng_seed):
    rng = np.random.default_rng(rng_seed)
    q, scopes = decode_problem(rng, batch=2, extra=False, dtype=jnp.float32)
    (cache, indices, topk_length), = scopes
    cache = jnp.asarray(np.nan_to_num(cache, nan=0.0))
    decode = lambda q, idx: jfm.flash_mla_with_kvcache(q, cache, None, None, 512, indices=idx,
                                                       topk_length=topk_length)
    stacked_q = jnp.stack([jnp.asarray(q), jnp.asarray(q[::-1])])
    stacked_idx = jnp.stack([indices, indices[:, ::-1]])
    mapped = jax.vmap(decode)(stacked_q, stacked_idx)
    for k in range(2):
        for g, w in zip(mapped, decode(stacked_q[k], stacked_idx[k])):
            np.testing.assert_allclose(np.asarray(g[k]), np.asarray(w), rtol=1e-6, atol=1e-6)
    # The gradient of a weighted sum of out, against central differences on a few entries of q.
    weights = jnp.asarray(rng.standard_normal((2, 2, 8, 512)), jnp.float32)
    loss = lambda q: jnp.sum(decode(q, jnp.asarray(indices))[0] * weights)
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(q)))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    for where in [(0, 0, 0, 3), (0, 1, 5, 200), (1, 0, 7, 575)]:
        step = np.zeros_like(q)
        step[where] = 1e-2
        numeric = (loss(jnp.asarray(q + step)) - loss(jnp.asarray(q - step))) / 2e-2
        np.testing.assert_allclose(grad[where], numeric, rtol=2e-2, atol=2e-3)


def test_flashmla_sparse_call_forms(rng_seed):
    """FlashMLA's V3.2 call: its newest get_mla_metadata() (or the older one with topk), positional
    (..., num_splits, softmax_scale, causal, is_fp8_kvcache, indices), block_table and cache_seqlens None."""
    rng = np.random.default_rng(rng_seed)
    q, scopes = decode_problem(rng, extra=False)
    (cache, indices, _), = scopes
    cache = jfm.quantize_kv_cache(np.nan_to_num(cache, nan=0.0))
    q = jnp.asarray(q, jnp.bfloat16)
    want = jfm.flash_mla_with_kvcache(q, cache, None, None, 512, is_fp8_kvcache=True, indices=indices)
    for metadata in (jfm.get_mla_metadata(), jfm.get_mla_metadata(jnp.zeros(3, jnp.int32), 16, 1, 8, True, 40)):
        assert metadata == (None, None)
        got = jfm.flash_mla_with_kvcache(q, cache, None, None, 512, *metadata, 576**-0.5, False, True, indices)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    # block_table, cache_seqlens and a schedule, if given, are not read.
    table = jnp.full((3, 4), -1, jnp.int32)
    got = jfm.flash_mla_with_kvcache(q, cache, table, jnp.zeros(3, jnp.int32), 512, is_fp8_kvcache=True,
                                     indices=indices)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))


@pytest.mark.parametrize("h_kv", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_sparse_prefill_matches_float64_oracle(h_kv, dtype, rng_seed):
    rng = np.random.default_rng([rng_seed, h_kv])
    s_q, h_q, topk = 6, 8, 50
    cache, readable = sparse_cache(rng, 3, 64, h_kv, dtype)
    kv = cache.reshape(-1, h_kv, 576)
    q = np.asarray(jnp.asarray(rng.standard_normal((s_q, h_q, 576)) / 10, dtype), np.float32)
    indices = hostile_indices(rng, (s_q, h_kv, topk), kv.shape[0], readable)
    topk_length = np.array([topk, 3, 0, topk + 9, 17, 1], np.int32)
    scale = 576**-0.5
    out, max_logits, lse = jax.jit(jfm.flash_mla_sparse_fwd, static_argnums=(3, 4))(
        jnp.asarray(q, dtype), jnp.asarray(kv, dtype), indices, scale, 512, SINKS, topk_length)
    with np.errstate(over="ignore"):
        want_out, want_max, want_lse = sparse_prefill_oracle(q, np.nan_to_num(kv, nan=1e30), indices, 512, scale,
                                                             topk_length, attn_sink=SINKS)
    assert out.dtype == dtype and out.shape == (s_q, h_q, 512)
    assert_out_close(out, want_out, dtype)
    assert_lse_close(lse, want_lse)
    assert np.all(np.isneginf(np.asarray(max_logits[2]))) and np.all(np.isposinf(np.asarray(lse[2])))
    finite = np.isfinite(want_max)
    np.testing.assert_allclose(np.asarray(max_logits)[finite], want_max[finite], atol=1e-5, rtol=0)
    # Without topk_length every index up to topk counts.
    out, _, lse = jfm.flash_mla_sparse_fwd(jnp.asarray(q, dtype), jnp.asarray(kv, dtype), indices, scale)
    want_out, _, want_lse = sparse_prefill_oracle(q, np.nan_to_num(kv, nan=1e30), indices, 512, scale)
    assert_out_close(out, want_out, dtype)
    assert_lse_close(lse, want_lse)


def test_cache_sparse_indices_follow_the_block_table(rng_seed):
    rng = np.random.default_rng(rng_seed)
    table = jnp.asarray([[3, 0, 7], [5, -2, 2**30]], jnp.int32)
    cache = jfm.PagedKVCache.create(batch_size=2, max_seq_len=192, head_dim=576, block_table=table, num_pages=6)
    tokens = jnp.asarray(rng.standard_normal((2, 192, 1, 576)), jnp.bfloat16)
    cache = cache.append(tokens)
    positions = jnp.asarray([[[0, 63, 64, 130, 191, 192, -1]], [[5, 70, 150, -5, 200, 64, 0]]])
    indices = np.asarray(cache.sparse_indices(positions))
    assert indices.dtype == np.int32
    # Page 7 and the negative and 2**30 page ids are not in the pool; positions past capacity or negative neither.
    np.testing.assert_array_equal(indices, [[[3 * 64, 3 * 64 + 63, 0, -1, -1, -1, -1]],
                                            [[5 * 64 + 5, -1, -1, -1, -1, -1, 5 * 64]]])
    pool = np.asarray(cache.layer_pages(0), np.float32).reshape(-1, 576)
    for i, s, k in zip(*np.nonzero(indices >= 0)):
        np.testing.assert_array_equal(pool[indices[i, s, k]], np.asarray(tokens, np.float32)[i, positions[i, s, k], 0])
    with pytest.raises(TypeError, match=r"positions must be integers of shape \(2, \.\.\., topk\)"):
        cache.sparse_indices(jnp.zeros((3, 1, 4), jnp.int32))
    # Any integer width, without wrapping: 2**32 + 5 must not read position 5.
    for dtype in (np.int16, np.uint8, np.uint32):
        narrow = np.asarray(positions)[..., :5].clip(0, np.iinfo(dtype).max).astype(dtype)
        np.testing.assert_array_equal(cache.sparse_indices(narrow), cache.sparse_indices(narrow.astype(np.int32)))
    assert (np.asarray(cache.sparse_indices(jnp.full((2, 1, 1), 2**32 - 1, jnp.uint32))) == -1).all()


def test_wide_numpy_indices_convert_only_when_they_fit_int32(rng_seed):
    """NumPy int64 (np.arange's type) is taken when its values fit int32; a value past int32, which jnp.asarray
    would wrap into a valid-looking index or page id, is refused by name."""
    rng = np.random.default_rng(rng_seed)
    q, scopes = decode_problem(rng, extra=False)
    (cache, indices, topk_length), = scopes
    args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(np.nan_to_num(cache, nan=0.0), jnp.bfloat16), None, None, 512)
    want = jfm.flash_mla_with_kvcache(*args, indices=indices, topk_length=topk_length)
    got = jfm.flash_mla_with_kvcache(*args, indices=indices.astype(np.int64), topk_length=topk_length.astype(np.int64))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    wrapped = indices.astype(np.int64)
    wrapped[0, 0, 0] = 2**32 + 5
    with pytest.raises(ValueError, match=r"indices must be int32, got a NumPy shape \(3, 2, 40\) and dtype int64 with "
                                         r"values in \[.*, 4294967301\], outside int32's range"):
        jfm.flash_mla_with_kvcache(*args, indices=wrapped)
    with pytest.raises(ValueError, match=r"topk_length must be int32, got a NumPy"):
        jfm.flash_mla_with_kvcache(*args, indices=indices, topk_length=np.array([0, 1, 2**33]))
    with pytest.raises(ValueError, match=r"block_table must be int32, got a NumPy"):
        jfm.flash_mla_with_kvcache(*args[:2], np.array([[0], [1], [2**32]]), np.zeros(3, np.int32), 512)
    with pytest.raises(ValueError, match=r"^indices must be int32, got a NumPy"):
        jfm.flash_mla_sparse_fwd(args[0][0], args[1].reshape(-1, 1, 576), wrapped[0][:, None, :], 0.05)


S = jax.ShapeDtypeStruct
Q = S((2, 1, 8, 576), jnp.bfloat16)
IDX = S((2, 1, 32), jnp.int32)
BF16_CACHE = S((4, 64, 1, 576), jnp.bfloat16)
FP8_CACHE = S((4, 64, 1, 656), jnp.float8_e4m3fn)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(causal=True), ValueError, r"causal must be False with sparse attention \(indices=\)"),
    (dict(k_cache=FP8_CACHE), TypeError,
     r"k_cache must have q's dtype bfloat16 \(it holds packed FP8 tokens: pass is_fp8_kvcache=True\)"),
    (dict(is_fp8_kvcache=True), TypeError,
     r"k_cache must hold packed FP8 tokens with is_fp8_kvcache=True: .* got shape \(4, 64, 1, 576\)"),
    (dict(k_cache=FP8_CACHE, is_fp8_kvcache=True, q=S((2, 1, 8, 512), jnp.bfloat16)), ValueError,
     r"q's head dim must be 576 with an FP8 cache"),
    (dict(indices=S((2, 2, 32), jnp.int32)), ValueError, r"indices must have shape \(batch, s_q, topk\) = \(2, 1, topk"),
    (dict(indices=S((2, 1, 32), jnp.int16)), TypeError, r"indices must be int32"),
    (dict(indices=S((2, 1, 0), jnp.int32)), ValueError, r"indices must have shape"),
    (dict(topk_length=S((3,), jnp.int32)), ValueError, r"topk_length must have shape \(2,\) \(one count per sequence"),
    (dict(extra_k_cache=BF16_CACHE), ValueError, r"extra_k_cache and extra_indices_in_kvcache go together"),
    (dict(extra_topk_length=S((2,), jnp.int32)), ValueError, r"extra_topk_length counts entries of extra_indices"),
    (dict(extra_k_cache=S((4, 16, 2, 576), jnp.bfloat16), extra_indices_in_kvcache=IDX), ValueError,
     r"extra_k_cache must have k_cache's h_kv \(1\)"),
    (dict(k_cache=S((4, 64, 3, 576), jnp.bfloat16)), ValueError, r"q's h_q \(8\) must be a multiple of k_cache's h_kv"),
    (dict(head_dim_v=256), ValueError, r"head_dim_v must be 512"),
    (dict(layer=0), ValueError, r"layer=0 is only for a stacked k_cache of rank 5"),
])
def test_sparse_decode_refuses_bad_arguments_by_name(overrides, error, words):
    args = dict(q=Q, k_cache=BF16_CACHE, head_dim_v=512, indices=IDX)
    args.update(overrides)
    arrays = {k: v for k, v in args.items() if isinstance(v, S)}
    static = {k: v for k, v in args.items() if not isinstance(v, S)}

    def call(arrays):
        merged = {**arrays, **static}
        return jfm.flash_mla_with_kvcache(merged.pop("q"), merged.pop("k_cache"), None, None, merged.pop("head_dim_v"),
                                          **merged)
    with pytest.raises(error, match=words):
        jax.eval_shape(call, arrays)


def test_dense_calls_refuse_sparse_only_arguments():
    args = (Q, BF16_CACHE, S((2, 4), jnp.int32), S((2,), jnp.int32))
    dense = lambda **kw: jax.eval_shape(lambda *a: jfm.flash_mla_with_kvcache(*a, 512, **kw), *args)
    for name, value in (("topk_length", S((2,), jnp.int32)), ("extra_k_cache", BF16_CACHE),
                        ("extra_indices_in_kvcache", IDX), ("extra_topk_length", S((2,), jnp.int32))):
        with pytest.raises(ValueError, match=rf"^{name}=shape .* is an argument of sparse attention: pass indices="):
            dense(**{name: jnp.zeros(value.shape, value.dtype)})
    for fp8 in (True, 1, np.True_):
        with pytest.raises(NotImplementedError, match=r"is_fp8_kvcache=True without indices: .* dense decode of an "
                                                      r"FP8 cache is not supported yet"):
            dense(is_fp8_kvcache=fp8)
    with pytest.raises(NotImplementedError, match="dense decode of an FP8 cache"):
        jfm.get_mla_metadata(jnp.zeros(2, jnp.int32), 16, 1, 16, True)
    for topk in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"topk must be None \(dense attention\) or a positive Python int"):
            jfm.get_mla_metadata(jnp.zeros(2, jnp.int32), 16, 1, 16, False, topk)
    with pytest.raises(ValueError, match=r"num_heads_k must be a positive Python int"):  # checked, though not read
        jfm.get_mla_metadata(jnp.zeros(2, jnp.int32), 16, 0, 16, True, 64)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(q=S((4, 8, 576), jnp.float16)), TypeError, r"kv must have q's dtype float16"),
    (dict(kv=S((100, 1, 512), jnp.bfloat16)), ValueError, r"kv must have shape \(s_kv >= 1, h_kv >= 1, 576\)"),
    (dict(kv=S((100, 3, 576), jnp.bfloat16)), ValueError, r"q's h_q \(8\) must be a multiple of kv's h_kv \(3\)"),
    (dict(indices=S((4, 32), jnp.int32)), ValueError, r"indices must have rank 3 \(s_q, h_kv, topk\)"),
    (dict(topk_length=S((3,), jnp.int32)), ValueError, r"topk_length must have shape \(4,\) \(one count per query token"),
    (dict(q=S((4, 8, 128), jnp.bfloat16)), ValueError, r"q's head dim must be one of \(576, 512\)"),
])
def test_sparse_prefill_refuses_bad_arguments_by_name(overrides, error, words):
    args = dict(q=S((4, 8, 576), jnp.bfloat16), kv=S((100, 1, 576), jnp.bfloat16), indices=S((4, 1, 32), jnp.int32),
                topk_length=None)
    args.update(overrides)
    with pytest.raises(error, match=words):
        jax.eval_shape(lambda a: jfm.flash_mla_sparse_fwd(a["q"], a["kv"], a["indices"], 0.05,
                                                          topk_length=a["topk_length"]), args)
    with pytest.raises(ValueError, match="softmax_scale must be finite and positive"):
        jfm.flash_mla_sparse_fwd(jnp.zeros((4, 8, 576)), jnp.zeros((100, 1, 576)), jnp.zeros((4, 1, 3), jnp.int32), -1.0)


def test_sparse_decode_exports_without_custom_calls(rng_seed):
    """Sparse attention is plain XLA: jax.export for cuda needs no disabled checks, and the artifact runs here."""
    rng = np.random.default_rng(rng_seed)
    decode = jax.jit(lambda q, k, i: jfm.flash_mla_with_kvcache(q, k, None, None, 512, is_fp8_kvcache=True, indices=i))
    args = (jnp.asarray(rng.standard_normal((2, 1, 16, 576)), jnp.bfloat16),
            jfm.quantize_kv_cache(rng.standard_normal((4, 64, 1, 576)).astype(np.float32)),
            jnp.asarray(rng.integers(-1, 300, (2, 1, 32)), jnp.int32))
    exported = jax.export.export(decode, platforms=("cpu", "cuda"))(*args)
    assert "custom_call @jax_flashmla" not in exported.mlir_module()
    for got, want in zip(exported.call(*args), decode(*args)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.gpu
def test_sparse_decode_at_deepseek_v32_sizes(rng_seed):
    """DeepSeek-V3.2's shape on the GPU's XLA: h_q 128, topk 2048 (four chunks of keys), an FP8 cache, bf16 products
    on tensor cores, against the float64 oracle over the unpacked cache."""
    rng = np.random.default_rng(rng_seed)
    batch, s_q, h_q, topk, num_pages = 3, 2, 128, 2048, 80
    q = jnp.asarray(np.clip(rng.standard_normal((batch, s_q, h_q, 576)) / 10, -1, 1), jnp.bfloat16)
    packed = jfm.quantize_kv_cache(rng.standard_normal((num_pages, 64, 1, 576)).astype(np.float32) / 10)
    indices = rng.integers(-1, num_pages * 64, size=(batch, s_q, topk)).astype(np.int32)
    topk_length = np.array([topk, 1500, 0], np.int32)
    out, lse = jax.jit(lambda q, k, i, t: jfm.flash_mla_with_kvcache(q, k, None, None, 512, is_fp8_kvcache=True,
                                                                      indices=i, topk_length=t))(
        q, packed, indices, topk_length)
    unpacked = np.asarray(jfm.dequantize_kv_cache(packed), np.float32)
    want_out, want_lse = sparse_decode_oracle(np.asarray(q, np.float32), [(unpacked, indices, topk_length)], 512,
                                              576**-0.5)
    assert_out_close(out, want_out, jnp.bfloat16)
    assert_lse_close(lse, want_lse)
