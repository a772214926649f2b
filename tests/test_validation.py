"""Bad input is refused at trace time, naming the argument, what it got and what was expected."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import constants

from cases import make_problem

S = jax.ShapeDtypeStruct
GOOD = dict(q=S((2, 1, 16, 576), jnp.bfloat16), k_cache=S((8, 64, 1, 576), jnp.bfloat16),
            block_table=S((2, 4), jnp.int32), cache_seqlens=S((2,), jnp.int32))


def call(head_dim_v=512, md=None, splits=None, softmax_scale=None, layer=None, **overrides):
    args = {**GOOD, **overrides}

    def f(q, k_cache, block_table, cache_seqlens):
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, md, splits,
                                          softmax_scale=softmax_scale, layer=layer)

    return jax.eval_shape(f, args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"])


def test_good_input_passes():
    out, lse = call()
    assert out.shape == (2, 1, 16, 512) and out.dtype == jnp.bfloat16 and lse.shape == (2, 16, 1)
    for layer in (2, jnp.int32(1)):  # a stacked pool with a static or a traced layer
        out, lse = call(k_cache=S((3, 8, 64, 1, 576), jnp.bfloat16), layer=layer)
        assert out.shape == (2, 1, 16, 512) and lse.shape == (2, 16, 1)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(q=S((2, 1, 16, 576), jnp.int8)), TypeError, ["q must be bfloat16", "int8"]),
    (dict(q=S((2, 16, 576), jnp.bfloat16)), ValueError, ["q must have rank 4", "(2, 16, 576)"]),
    (dict(q=S((2, 1, 16, 128), jnp.bfloat16)), ValueError, ["q's head dim", "(576, 512)", "(2, 1, 16, 128)"]),
    (dict(k_cache=S((8, 64, 1, 576), jnp.float16)), TypeError, ["k_cache must have q's dtype bfloat16", "float16"]),
    (dict(k_cache=S((8, 32, 1, 576), jnp.bfloat16)), ValueError, ["pages must hold 64 tokens", "(8, 32, 1, 576)"]),
    (dict(k_cache=S((8, 64, 1, 512), jnp.bfloat16)), ValueError, ["k_cache's head dim must equal q's (576)"]),
    (dict(k_cache=S((8, 64, 3, 576), jnp.bfloat16)), ValueError, ["h_q (16) must be a multiple", "h_kv (3)"]),
    (dict(k_cache=S((64, 576), jnp.bfloat16)), ValueError, ["k_cache must have rank 4", "or rank 5"]),
    (dict(k_cache=S((3, 8, 64, 1, 576), jnp.bfloat16)), ValueError, ["stacked pool", "needs layer=",
                                                                    "(3, 8, 64, 1, 576)"]),
    (dict(k_cache=S((3, 8, 32, 1, 576), jnp.bfloat16), layer=0), ValueError, ["pages must hold 64 tokens (axis 2)"]),
    (dict(k_cache=S((0, 8, 64, 1, 576), jnp.bfloat16), layer=0), ValueError, ["layer must lie in [0, 0)"]),
    (dict(k_cache=S((3, 8, 64, 1, 576), jnp.bfloat16), layer=3), ValueError, ["layer must lie in [0, 3)", "got 3"]),
    (dict(k_cache=S((3, 8, 64, 1, 576), jnp.bfloat16), layer=-1), ValueError, ["layer must lie in [0, 3)"]),
    (dict(k_cache=S((3, 8, 64, 1, 576), jnp.bfloat16), layer=True), TypeError, ["layer must be an int"]),
    (dict(k_cache=S((3, 8, 64, 1, 576), jnp.bfloat16), layer=1.0), TypeError, ["layer must be a Python int"]),
    (dict(k_cache=S((3, 8, 64, 1, 576), jnp.bfloat16), layer=jnp.zeros(2, jnp.int32)), TypeError,
     ["integer scalar array"]),
    (dict(layer=0), ValueError, ["layer=0 is only for a stacked k_cache of rank 5", "(8, 64, 1, 576)"]),
    (dict(block_table=S((2, 4), jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32)), TypeError,
     ["block_table must be int32"]),
    (dict(block_table=S((3, 4), jnp.int32)), ValueError, ["block_table must have shape (2, max_pages_per_seq", "(3, 4)"]),
    (dict(block_table=S((8,), jnp.int32)), ValueError, ["block_table must have rank 2"]),
    (dict(block_table=S((2, 2**24 + 1), jnp.int32)), ValueError, ["max_pages_per_seq must be at most 2**24",
                                                                 "(2, 16777217)"]),
    # The scheduler counts the batch's pages in int32: b * (max_pages_per_seq + 5) <= 2**30.
    (dict(q=S((128, 1, 16, 576), jnp.bfloat16), block_table=S((128, 8_388_604), jnp.int32),
          cache_seqlens=S((128,), jnp.int32)), ValueError,
     ["max_pages_per_seq must be at most 8388603 for a batch of 128", "got max_pages_per_seq 8388604"]),
    (dict(q=S((178_956_971, 1, 1, 576), jnp.bfloat16), block_table=S((178_956_971, 1), jnp.int32),
          cache_seqlens=S((178_956_971,), jnp.int32)), ValueError, ["at most 178956970 sequences"]),
    (dict(q=S((2, 4097, 128, 576), jnp.bfloat16)), ValueError, ["s_q * h_q / h_kv at most 524280",
                                                                 "(2, 4097, 128, 576)"]),
    (dict(q=S((2, 1, 65536, 576), jnp.bfloat16), k_cache=S((8, 64, 65536, 576), jnp.bfloat16)), ValueError,
     ["h_kv must be at most 65535", "h_kv 65536"]),
    (dict(cache_seqlens=S((3,), jnp.int32)), ValueError, ["cache_seqlens must have shape (2,)", "(3,)"]),
    (dict(cache_seqlens=S((2,), jnp.float32)), TypeError, ["cache_seqlens must be int32", "float32"]),
])
def test_bad_inputs(overrides, error, words):
    with pytest.raises(error) as info:
        call(**overrides)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("head_dim_v", [576, 600, 128, 512.0])
def test_bad_head_dim_v(head_dim_v):
    with pytest.raises(ValueError, match="head_dim_v must be 512"):
        call(head_dim_v=head_dim_v)


def test_head_dim_v_larger_than_d():
    with pytest.raises(ValueError, match="at most q's head dim"):
        call(head_dim_v=576, q=S((2, 1, 16, 512), jnp.bfloat16), k_cache=S((8, 64, 1, 512), jnp.bfloat16))


def test_metadata_checks():
    md, splits = S((132, 8), jnp.int32), S((3,), jnp.int32)
    with pytest.raises(ValueError, match="go together"):
        call(splits=splits)
    out, _ = call(md=S((1, 1), jnp.float32))  # metadata without num_splits (FlashMLA's newest form) is not read
    assert out.shape == (2, 1, 16, 512)
    with pytest.raises(ValueError, match=r"num_splits must have shape \(3,\)"):
        call(md=md, splits=S((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata must have shape \(num_parts >= 1, 8\)"):
        call(md=S((132, 4), jnp.int32), splits=splits)
    with pytest.raises(TypeError, match="tile_scheduler_metadata must be int32"):
        call(md=S((132, 8), jnp.float32), splits=splits)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k must be a positive"):
        jfm.get_mla_metadata(jnp.zeros(2, jnp.int32), 0, 1)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        jfm.get_mla_metadata(jnp.zeros(2, jnp.float32), 16, 1)
    md_list, splits_list = jfm.get_mla_metadata([3, 4], 16, 1, num_sms=8)  # a list converts, as q's arguments do
    assert md_list.shape == (8, 8) and splits_list.shape == (3,)
    for num_sms in (0, -3, 65536, 8.0, True):
        with pytest.raises(ValueError, match=r"num_sms must be None \(the GPU's count\) or a Python int in \[1, 65535\]"):
            jfm.get_mla_metadata(jnp.zeros(2, jnp.int32), 16, 1, num_sms=num_sms)
    with pytest.raises(ValueError, match="1 to 65535 parts"):
        call(md=S((65536, 8), jnp.int32), splits=splits)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata must have rank 2 \(num_parts, 8\), got shape \(\)"):
        call(md=7, splits=[0, 1, 2])  # converted like a list, then refused by rank


def test_flashmla_call_forms_port_unchanged(rng_seed):
    """FlashMLA's two interfaces, argument for argument: get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, h_q,
    is_fp8_kvcache, topk) with positional decode arguments, and its newest get_mla_metadata() with no argument
    (the schedule is then computed inside the call). Both give this package's usual call's answer."""
    rng = np.random.default_rng(rng_seed)
    p = make_problem(rng, batch=3, s_q=2, h_q=8, h_kv=2, seqlens=np.array([70, 0, 130], np.int32),
                     dtype=jnp.bfloat16)
    args = (p.q, p.k_cache, p.block_table, p.cache_seqlens, 512)
    want = jfm.flash_mla_with_kvcache(*args, causal=True)
    md, splits = jfm.get_mla_metadata(p.cache_seqlens, 2 * 8 // 2, 2, 8, False, None)
    older = jfm.flash_mla_with_kvcache(*args, md, splits, None, True, False, None)
    sched_meta, no_splits = jfm.get_mla_metadata()
    assert sched_meta is None and no_splits is None
    newest = jfm.flash_mla_with_kvcache(*args, sched_meta, no_splits, None, True, False, None, None, None, None,
                                        None, None)
    # Its README calls get_mla_metadata with arguments and passes num_splits=None (which its decode requires).
    newest_readme = jax.jit(lambda md, *a: jfm.flash_mla_with_kvcache(*a, 512, md, None, causal=True, is_fp8_kvcache=0,
                                                                      indices=None))(md, *args[:4])
    for got in (older, newest, newest_readme):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    for false in (False, np.False_, 0, None):  # FlashMLA's dense path takes any false value
        jfm.flash_mla_with_kvcache(*args, is_fp8_kvcache=false)
    with pytest.raises(TypeError, match=r"is_fp8_kvcache must be a Python bool known at trace time, got shape \(\)"):
        jfm.flash_mla_with_kvcache(*args, is_fp8_kvcache=jnp.bool_(False))
    # FlashMLA's README passes (causal, is_fp8_kvcache, indices) right after num_splits, which puts causal in
    # softmax_scale: named as that, not as an FP8 request.
    with pytest.raises(TypeError, match="got the bool True: FlashMLA's order is .* pass causal= by keyword"):
        jfm.flash_mla_with_kvcache(*args, md, splits, True, False, None)


LENGTHS = jnp.zeros(2, jnp.int32)


def test_flashmla_argument_checks():
    for num_heads_q, words in ((3, "num_heads_q must be None or a positive multiple of num_heads_k (2)"),
                               (0, "num_heads_q must be None"), (8.0, "num_heads_q must be None"),
                               (12, "num_q_tokens_per_head_k must be s_q * num_heads_q // num_heads_k, a multiple "
                                    "of 6, got 16")):
        with pytest.raises(ValueError) as info:
            jfm.get_mla_metadata(LENGTHS, 16, 2, num_heads_q)
        assert words in str(info.value), str(info.value)
    with pytest.raises(TypeError, match="missing num_q_tokens_per_head_k, num_heads_k"):
        jfm.get_mla_metadata(LENGTHS)
    with pytest.raises(TypeError, match="missing cache_seqlens"):
        jfm.get_mla_metadata(num_q_tokens_per_head_k=16, num_heads_k=1)
    with pytest.raises(TypeError, match="missing cache_seqlens, num_q_tokens_per_head_k, num_heads_k"):
        jfm.get_mla_metadata(num_sms=8)
    q, k_cache, table, seqlens = GOOD.values()
    for args, name in (((q, k_cache, None, seqlens), "block_table"), ((q, k_cache, table, None), "cache_seqlens")):
        with pytest.raises(TypeError, match=f"{name} is required"):
            jfm.flash_mla_with_kvcache(*args, 512)
    for sink, error, words in ((S((15,), jnp.float32), ValueError, "attn_sink must have shape (16,)"),
                               (S((1, 16), jnp.float32), ValueError, "attn_sink must have shape (16,)"),
                               (S((16,), jnp.int32), TypeError, "attn_sink must be a float array of shape (16,)")):
        with pytest.raises(error) as info:
            jax.eval_shape(lambda sink, *args: jfm.flash_mla_with_kvcache(*args, 512, attn_sink=sink), sink,
                           *GOOD.values())
        assert words in str(info.value) and "(one logit per query head), got shape" in str(info.value)
    with pytest.raises(TypeError, match=r"attn_sink must be a float array of shape \(16,\), got 'x'"):
        jax.eval_shape(lambda *args: jfm.flash_mla_with_kvcache(*args, 512, attn_sink="x"), *GOOD.values())


def test_vmap_folded_batch_must_fit_the_scheduler():
    """vmap folds its axis into the decode's batch: 2 x 64 sequences are scheduled as 128, so a block table that
    fits a batch of 64 (16,777,211 columns at most) but not one of 128 (8,388,603) is refused, naming vmap."""
    q, cache = S((2, 64, 1, 16, 576), jnp.bfloat16), S((8, 64, 1, 576), jnp.bfloat16)
    seqlens = S((2, 64), jnp.int32)
    decode = lambda q, table, lengths: jfm.flash_mla_with_kvcache(q, cache_zeros, table, lengths, 512)
    cache_zeros = jnp.zeros(cache.shape, cache.dtype)
    jax.eval_shape(jax.vmap(decode), q, S((2, 64, 8_388_603), jnp.int32), seqlens)  # fits 128
    with pytest.raises(ValueError, match=r"at most 8388603 for a batch of 128 \(the batch as the primitive"):
        jax.eval_shape(jax.vmap(decode), q, S((2, 64, 8_388_604), jnp.int32), seqlens)


def test_softmax_scale_checks():
    with pytest.raises(ValueError, match="finite and positive"):
        call(softmax_scale=-1.0)
    with pytest.raises(TypeError, match="Python float"):
        call(softmax_scale=jnp.float32(0.1))


def test_constants_match_the_cuda_side():
    """jax_flashmla/constants.py and src/mla_params.h state the same sizes (the limits checked here among them); a
    change to one alone fails here."""
    header = (pathlib.Path(__file__).resolve().parents[1] / "src" / "mla_params.h").read_text()
    cuda = {name: eval(expr, {"__builtins__": {}}) for name, expr in
            re.findall(r"constexpr int (k\w+) = ([0-9 <]+);", header)}
    assert cuda["kPageSize"] == constants.PAGE_SIZE
    assert cuda["kMaxPagesPerSeq"] == constants.MAX_PAGES_PER_SEQ
    assert cuda["kMetadataRowInts"] == constants.METADATA_ROW_INTS
    assert cuda["kSplitOverheadBlocks"] == constants.SPLIT_OVERHEAD_BLOCKS
    assert cuda["kNarrowMaxQueryRows"] == constants.NARROW_MAX_QUERY_ROWS  # the schedule's charge follows it
    assert cuda["kScheduleUnitLimit"] == constants.SCHEDULE_UNIT_LIMIT
    assert cuda["kMaxGridYZ"] == constants.MAX_GRID_YZ
    assert "kMaxScheduleParts = kMaxGridYZ;" in header and constants.MAX_SCHEDULE_PARTS == constants.MAX_GRID_YZ
    assert "kMaxQueryRows = 8 * kMaxGridYZ;" in header and constants.MAX_QUERY_ROWS == 8 * constants.MAX_GRID_YZ
    assert "kMaxScheduledBatch = kScheduleUnitLimit / (kSplitOverheadBlocks + 1);" in header
    assert constants.MAX_SCHEDULED_BATCH == constants.SCHEDULE_UNIT_LIMIT // (constants.SPLIT_OVERHEAD_BLOCKS + 1)
