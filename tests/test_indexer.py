"""DeepSeek-V3.2's lightning indexer (jax_flashmla/indexer.py), its keys in the paged cache, and the MLA module
and model attending through it.

References: a float64 NumPy loop for the scores; HF transformers' DeepseekV32Indexer on shared weights (skipped
without torch and transformers); and, for the module, the two independent paths agreeing with each other:
prefill's dense attention under the indexer's mask, and decode's sparse attention over the indexer's picks read
back from the paged cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flashmla.cache import PagedKVCache
from jax_flashmla.indexer import LightningIndexer, index_scores, select_topk
from jax_flashmla.mla_module import MLAConfig, MultiHeadLatentAttention
from jax_flashmla.model import DecoderConfig, build_model, generate, recompute_logits
from jax_flashmla.rope import YarnScaling

# Small, with index_head_dim != qk_rope_head_dim so a split at the wrong place shows.
INDEXED = MLAConfig(hidden_size=64, num_heads=3, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=48,
                    qk_rope_head_dim=64, v_head_dim=40, index_topk=6, index_n_heads=4, index_head_dim=96)

PREFILL = nnx.jit(MultiHeadLatentAttention.prefill, static_argnames=("layer",))
DECODE = nnx.jit(MultiHeadLatentAttention.decode, static_argnames=("layer",))


@functools.partial(nnx.jit, static_argnums=0)
def _init_module(config, seed):
    return MultiHeadLatentAttention(config, rngs=nnx.Rngs(jax.random.key(seed)))


def indexed_module(config=INDEXED, seed=0):
    module = _init_module(config, jnp.asarray(seed, jnp.uint32))
    key = jax.random.key(seed + 100)  # norm weights and bias away from 1 and 0, so the tests see them applied
    for norm in (module.kv_a_layernorm, module.q_a_layernorm, module.indexer.k_norm):
        key, k1, k2 = jax.random.split(key, 3)
        weight = norm.weight[...]
        norm.weight[...] = jax.random.uniform(k1, weight.shape, minval=0.5, maxval=1.5).astype(weight.dtype)
        if hasattr(norm, "bias"):
            norm.bias[...] = (0.3 * jax.random.normal(k2, weight.shape)).astype(weight.dtype)
    return module


def numpy_scores(q, weights, keys):
    """float64 loops: sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s] / sqrt(d))."""
    q, weights, keys = (np.asarray(a, np.float64) for a in (q, weights, keys))
    b, s_q, h, d = q.shape
    out = np.zeros((b, s_q, keys.shape[1]))
    for i in range(b):
        for t in range(s_q):
            for head in range(h):
                out[i, t] += weights[i, t, head] * np.maximum(keys[i] @ q[i, t, head] / np.sqrt(d), 0)
    return out


# --------------------------------------------------------------------------------------------------------
# Scores and top-k
# --------------------------------------------------------------------------------------------------------


def test_scores_match_a_float64_loop_and_mask_what_is_not_visible():
    rng = np.random.default_rng(0)
    b, s_q, h, d, n = 2, 3, 5, 24, 40
    q, weights, keys = rng.normal(size=(b, s_q, h, d)), rng.normal(size=(b, s_q, h)), rng.normal(size=(b, n, d))
    visible = rng.random((b, s_q, n)) < 0.7
    keys[0, 7] = np.nan  # a slot no query sees (never written): must reach no other score
    visible[0, :, 7] = False
    got = np.asarray(index_scores(*(jnp.asarray(a, jnp.float32) for a in (q, weights, keys)), jnp.asarray(visible)))
    want = numpy_scores(q, weights, np.nan_to_num(keys))
    np.testing.assert_allclose(got[visible], want[visible], rtol=1e-5, atol=1e-5)
    assert np.all(got[~visible] == -np.inf)


@pytest.mark.parametrize("keys_per_step", [1, 7, 16, 40, 1000])
def test_scores_taken_a_few_keys_at_a_time_are_the_same(keys_per_step):
    rng = np.random.default_rng(10)
    q, weights, keys = rng.normal(size=(2, 3, 5, 24)), rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 40, 24))
    visible = jnp.asarray(rng.random((2, 3, 40)) < 0.7)
    q, weights, keys = (jnp.asarray(a, jnp.float32) for a in (q, weights, keys))
    want = index_scores(q, weights, keys, visible, keys_per_step=40)
    got = index_scores(q, weights, keys, visible, keys_per_step=keys_per_step)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got == -jnp.inf, ~visible)


def test_topk_is_best_first_pads_with_minus_one_and_breaks_ties_low():
    scores = jnp.asarray([[[0.5, 2.0, -jnp.inf, 2.0, 1.0, -jnp.inf]]])  # (1, 1, 6): two visible keys tie at 2.0
    np.testing.assert_array_equal(select_topk(scores, 3), [[[1, 3, 4]]])
    np.testing.assert_array_equal(select_topk(scores, 5), [[[1, 3, 4, 0, -1]]])  # 4 visible keys
    np.testing.assert_array_equal(select_topk(scores, 9), [[[1, 3, 4, 0, -1, -1, -1, -1, -1]]])  # past n_keys
    assert select_topk(scores, 9).dtype == jnp.int32


def test_layer_norm_is_the_float32_formula_with_eps_1e_6_and_bias():
    """Inputs of tiny variance, where an eps of another size shows."""
    from jax_flashmla.indexer import LayerNorm

    norm = LayerNorm(8)
    norm.weight[...] = jnp.linspace(0.5, 1.5, 8)
    norm.bias[...] = jnp.linspace(-0.2, 0.3, 8)
    x = 1.0 + 1e-3 * np.random.default_rng(9).normal(size=(3, 8))
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    want = want * np.linspace(0.5, 1.5, 8) + np.linspace(-0.2, 0.3, 8)
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), want, rtol=0, atol=2e-3)


# --------------------------------------------------------------------------------------------------------
# Against HF transformers' DeepseekV32Indexer
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("yarn", [None, YarnScaling(factor=40.0, mscale=0.707, mscale_all_dim=1.0)])
def test_indexer_picks_what_hf_picks(yarn):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_mod

    from test_mla_module import _hf_rope_parameters

    c = dataclasses.replace(INDEXED, yarn=yarn)
    hf_config = transformers.DeepseekV32Config(
        hidden_size=c.hidden_size, num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads,
        q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, index_topk=c.index_topk,
        index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim, max_position_embeddings=163840,
        rope_parameters=_hf_rope_parameters(yarn), num_hidden_layers=1)  # fmt: skip
    torch.manual_seed(0)
    hf = hf_mod.DeepseekV32Indexer(hf_config, layer_idx=0).eval()
    ours = LightningIndexer(hidden_size=c.hidden_size, q_lora_rank=c.q_lora_rank, n_heads=c.index_n_heads,
                            head_dim=c.index_head_dim, rope_head_dim=c.qk_rope_head_dim, rope_theta=c.rope_theta,
                            yarn=yarn, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith("k_norm"):
                p.copy_(torch.rand(p.shape) + 0.5 if name.endswith("weight") else 0.3 * torch.randn(p.shape))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            module_name, kind = name.split(".")
            value = jnp.asarray(p.detach().numpy())
            target = getattr(ours, module_name)
            if module_name == "k_norm":
                getattr(target, kind)[...] = value
            else:  # torch Linear stores (out, in); nnx.Linear's kernel is (in, out)
                target.kernel[...] = value.T

    rng = np.random.default_rng(1)
    s = 40
    x = rng.normal(size=(1, s, c.hidden_size)).astype(np.float32)
    q_lora = rng.normal(size=(1, s, c.q_lora_rank)).astype(np.float32)
    start = 1000  # positions far from 0, where a rope layout or scale slip shows
    rotary = hf_mod.DeepseekV32RotaryEmbedding(hf_config)
    positions = torch.arange(start, start + s)[None]
    mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)[None]
    with torch.no_grad():
        want = hf(torch.from_numpy(x), torch.from_numpy(q_lora), rotary(torch.from_numpy(x), positions), mask,
                  positions).numpy()

    jpos = jnp.asarray(positions.numpy(), jnp.int32)
    keys = ours.keys(jnp.asarray(x), jpos)
    visible = jnp.tril(jnp.ones((s, s), bool))[None]
    q, weights = ours.queries(jnp.asarray(x), jnp.asarray(q_lora), jpos)
    scores = np.asarray(index_scores(q, weights, keys, visible))
    got = np.asarray(select_topk(jnp.asarray(scores), c.index_topk))
    # HF returns min(topk, s) picks for every row; the first rows see fewer keys and fill up with masked ones.
    # Scores tie where every head's relu is 0 (the score is then exactly 0), and the two top-k's break ties
    # differently: the picks must have the same scores in the same order, and differ only among tied keys.
    for t in range(s):
        n = min(t + 1, c.index_topk)
        ours_, theirs = got[0, t, :n], want[0, t, :n]
        np.testing.assert_allclose(scores[0, t, ours_], scores[0, t, theirs], rtol=1e-5, err_msg=f"query {t}")
        tied = {int(k) for k in range(t + 1) if np.sum(np.isclose(scores[0, t, : t + 1], scores[0, t, k])) > 1}
        assert set(ours_.tolist()) ^ set(theirs.tolist()) <= tied, (t, ours_, theirs)
        assert np.all(got[0, t, n:] == -1)
    assert sum(len(set(got[0, t]) ^ set(want[0, t, : len(got[0, t])])) == 0 for t in range(s)) > s // 2


# --------------------------------------------------------------------------------------------------------
# The keys in the paged cache
# --------------------------------------------------------------------------------------------------------


def test_index_keys_round_trip_through_a_scattered_block_table():
    rng = np.random.default_rng(2)
    table = jnp.asarray([[5, 2, -1], [0, 7, 3]], jnp.int32)  # row 0's third page is invalid
    cache = PagedKVCache.create(batch_size=2, max_seq_len=190, num_layers=2, head_dim=576, dtype=jnp.bfloat16,
                                block_table=table, num_pages=8, index_head_dim=16)
    assert cache.index_pages.shape == (2, 8, 64, 1, 16) and cache.index_pages.dtype == jnp.bfloat16
    cache = dataclasses.replace(cache, seqlens=jnp.asarray([100, 3], jnp.int32))
    new = jnp.asarray(rng.normal(size=(2, 40, 16)), jnp.float32)
    cache = cache.write_index_keys(new, layer=1, num_new=jnp.asarray([40, 30]))
    keys, on_valid_page = cache.index_keys(1)
    assert keys.shape == (2, 192, 16)
    np.testing.assert_array_equal(on_valid_page[0], np.arange(192) < 128)
    np.testing.assert_array_equal(keys[0, 100:128], new[0, :28].astype(jnp.bfloat16))  # up to the invalid page
    assert not jnp.any(keys[0, 128:])  # dropped there, and the invalid page reads as zeros
    np.testing.assert_array_equal(keys[1, 3:33], new[1, :30].astype(jnp.bfloat16))
    assert not jnp.any(keys[1, 33:])  # past num_new
    assert not jnp.any(cache.index_keys(0)[0])  # the other layer untouched


def test_append_writes_the_keys_with_the_entries_and_refuses_to_count_tokens_without_them():
    cache = PagedKVCache.create(batch_size=1, max_seq_len=64, dtype=jnp.float32, index_head_dim=4)
    with pytest.raises(ValueError, match="index_keys= must be given exactly when the cache keeps indexer keys"):
        cache.append(jnp.ones((1, 3, 1, 576)))
    with pytest.raises(ValueError, match="index_keys must hold the same 3 tokens as kv"):
        cache.append(jnp.ones((1, 3, 1, 576)), index_keys=jnp.ones((1, 2, 4)))
    cache = cache.append(jnp.ones((1, 3, 1, 576)), index_keys=jnp.full((1, 3, 4), 2.0), num_new=2)
    assert int(cache.seqlens[0]) == 2
    np.testing.assert_array_equal(cache.index_keys()[0][0, :3, 0], [2, 2, 0])
    with pytest.raises(ValueError, match="index_keys= must be given exactly when the cache keeps indexer keys"):
        PagedKVCache.create(batch_size=1, max_seq_len=64).append(jnp.ones((1, 1, 1, 576)), index_keys=jnp.ones((1, 1, 4)))


def test_index_pages_that_do_not_match_the_pages_are_refused():
    cache = PagedKVCache.create(batch_size=1, max_seq_len=64, num_layers=2, index_head_dim=4)
    for shape in [(2, 2, 64, 1, 4), (1, 1, 64, 1, 4), (2, 1, 64, 2, 4), (2, 1, 64, 4)]:
        bad = dataclasses.replace(cache, index_pages=jnp.zeros(shape, jnp.bfloat16))
        with pytest.raises(ValueError, match=r"index_pages must have shape \(2, 1, 64, 1, 'index_head_dim'\)"):
            bad.write_index_keys(jnp.ones((1, 3, 4)))
        with pytest.raises(ValueError, match="index_pages must have shape"):
            bad.index_keys()


def test_index_pages_default_to_bfloat16_beside_an_fp8_pool_and_errors_name_the_problem():
    fp8 = PagedKVCache.create(batch_size=1, max_seq_len=64, dtype=jnp.float8_e4m3fn, index_head_dim=8)
    assert fp8.index_pages.dtype == jnp.bfloat16
    plain = PagedKVCache.create(batch_size=1, max_seq_len=64)
    assert plain.index_pages is None and len(jax.tree.leaves(plain)) == 3
    with pytest.raises(ValueError, match="keeps no indexer keys: create it with index_head_dim="):
        plain.index_keys()
    with pytest.raises(ValueError, match=r"keys must have shape \(1, s_new, 8\)"):
        fp8.write_index_keys(jnp.zeros((1, 2, 9)))
    with pytest.raises(TypeError, match="index_dtype must be a 16- or 32-bit float type"):
        PagedKVCache.create(batch_size=1, max_seq_len=64, index_head_dim=8, index_dtype=jnp.int8)
    with pytest.raises(ValueError, match="index_head_dim must be None or a positive int"):
        PagedKVCache.create(batch_size=1, max_seq_len=64, index_head_dim=0)
    with pytest.raises(ValueError, match="index_dtype is the dtype of the indexer keys: pass index_head_dim= too"):
        PagedKVCache.create(batch_size=1, max_seq_len=64, index_dtype=jnp.float32)


# --------------------------------------------------------------------------------------------------------
# The MLA module
# --------------------------------------------------------------------------------------------------------


def _cache(config, batch, max_seq_len, dtype=jnp.float32, **kw):
    return PagedKVCache.create(batch_size=batch, max_seq_len=max_seq_len, dtype=dtype,
                               index_head_dim=config.index_head_dim, **kw)


def test_prefill_with_a_topk_past_the_prompt_is_dense_attention():
    """Every visible key chosen: the same outputs as the module without an indexer (same weights)."""
    dense_config = dataclasses.replace(INDEXED, index_topk=None)
    sparse = indexed_module(dataclasses.replace(INDEXED, index_topk=50))
    dense = MultiHeadLatentAttention(dense_config, rngs=nnx.Rngs(0))
    nnx.update(dense, nnx.state(sparse, lambda path, _: "indexer" not in path))
    x = jax.random.normal(jax.random.key(3), (2, 50, INDEXED.hidden_size))
    lengths = jnp.asarray([50, 31])
    want, _ = PREFILL(dense, x, lengths)
    got, _ = PREFILL(sparse, x, lengths)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))
    # and with topk 6 of up to 50 keys the indexer does change the result
    narrow = indexed_module(INDEXED)
    nnx.update(narrow, nnx.state(sparse))
    assert float(jnp.abs(PREFILL(narrow, x, lengths)[0] - want).max()) > 1e-3


@pytest.mark.parametrize("s_q", [1, 3])
def test_decode_through_the_cache_equals_prefill_under_the_indexer_mask(s_q):
    """Two independent paths: decode reads the indexer keys back from the paged cache, picks top-k and runs the
    sparse decode; prefill over the whole sequence masks its dense scores with the indexer's picks."""
    module = indexed_module()
    b, s0, hidden = 3, 70, INDEXED.hidden_size  # 70 + 3 crosses a page boundary
    x = jax.random.normal(jax.random.key(4), (b, s0 + s_q, hidden))
    lengths = jnp.asarray([s0, 9, 64])
    cache = _cache(INDEXED, b, 200)
    _, cache = PREFILL(module, x[:, :s0], lengths, cache)
    cache = cache.advance(lengths)
    rows = jnp.arange(b)[:, None] + jnp.zeros((1, s_q), jnp.int32)
    x_new = x[rows, lengths[:, None] + jnp.arange(s_q)]  # each row's next s_q tokens
    got, cache = DECODE(module, x_new, cache)
    for i in range(b):  # each row alone: its prompt then its new tokens, one prefill
        n = int(lengths[i])
        seq = jnp.concatenate([x[i : i + 1, :n], x_new[i : i + 1]], axis=1)
        want, _ = PREFILL(module, seq)
        np.testing.assert_allclose(got[i], want[0, n:], rtol=0, atol=2e-5 * float(jnp.abs(want).max()),
                                   err_msg=f"row {i}")


def test_decode_never_reads_the_slots_the_indexer_passes_over():
    module = indexed_module()
    b, s0 = 2, 90
    x = jax.random.normal(jax.random.key(5), (b, s0 + 1, INDEXED.hidden_size))
    cache = _cache(INDEXED, b, 128)
    _, cache = PREFILL(module, x[:, :s0], None, cache)
    cache = cache.advance(s0)
    want, after = DECODE(module, x[:, s0:], cache)
    keys, _ = cache.index_keys(0)
    _, _, q_lora = module._queries(x[:, s0:], jnp.full((b, 1), s0))
    picked = np.asarray(module._indexer_topk(x[:, s0:], q_lora, jnp.full((b, 1), s0), after, 0))
    assert (picked >= 0).sum() == b * INDEXED.index_topk
    # NaN into every slot of the latent pool no pick names (the new token's own slot is rewritten by decode)
    poison = np.ones(cache.pages.shape[:3], bool)
    for i in range(b):
        for p in picked[i, 0]:
            page = int(cache.block_table[i, p // 64])
            poison[0, page, p % 64] = False
    pages = jnp.where(jnp.asarray(poison)[..., None, None], jnp.nan, cache.pages)
    got, _ = DECODE(module, x[:, s0:], dataclasses.replace(cache, pages=pages))
    np.testing.assert_array_equal(got, want)


def test_weights_proj_stays_float32_under_16_bit_params():
    module = indexed_module(dataclasses.replace(INDEXED, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))
    assert module.indexer.weights_proj.kernel[...].dtype == jnp.float32
    assert module.indexer.wq_b.kernel[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("seqlens", [[150, 140], [-7, 0]])
def test_decode_picks_only_what_each_query_may_see(seqlens):
    """A page id that is invalid below seqlens (row 0's second page), and negative lengths (clipped to 0 as the
    decode clips them): the picks lie at or before each query's own position, on valid pages, and fill topk
    wherever enough such positions exist."""
    module = indexed_module()
    s_q = 2
    table = jnp.asarray([[0, -1, 1], [2, 3, 4]], jnp.int32)
    cache = _cache(INDEXED, 2, 192, block_table=table, num_pages=5)
    rng = np.random.default_rng(8)  # random keys and entries everywhere, as if earlier steps had written them
    cache = dataclasses.replace(cache, seqlens=jnp.asarray(seqlens, jnp.int32),
                                pages=jnp.asarray(rng.normal(size=cache.pages.shape), jnp.float32),
                                index_pages=jnp.asarray(rng.normal(size=cache.index_pages.shape), jnp.float32))
    x = jax.random.normal(jax.random.key(6), (2, s_q, INDEXED.hidden_size))
    positions = jnp.asarray(seqlens)[:, None] + jnp.arange(s_q)
    _, cache_after = DECODE(module, x, cache)
    _, _, q_lora = module._queries(x, positions)
    picked = np.asarray(module._indexer_topk(x, q_lora, positions, cache_after, 0))
    for i in range(2):
        valid = np.repeat(np.asarray(table[i]) >= 0, 64)
        for j in range(s_q):
            own = max(seqlens[i], 0) + j
            allowed = np.flatnonzero(valid[: own + 1])
            got = picked[i, j][picked[i, j] >= 0]
            assert set(got.tolist()) <= set(allowed.tolist()), (i, j, got)
            assert len(got) == min(INDEXED.index_topk, len(allowed)) and len(set(got.tolist())) == len(got)
    out, _ = DECODE(module, x, cache)
    assert np.isfinite(np.asarray(out)).all()


def test_indexer_config_and_cache_errors_name_the_problem():
    with pytest.raises(ValueError, match="index_topk needs q_lora_rank"):
        dataclasses.replace(INDEXED, q_lora_rank=None)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="index_topk must be None or a positive int"):
            dataclasses.replace(INDEXED, index_topk=bad)
    with pytest.raises(ValueError, match=r"index_head_dim must be an int of at least qk_rope_head_dim \(64\)"):
        dataclasses.replace(INDEXED, index_head_dim=32)
    module = indexed_module()
    x = jnp.ones((1, 1, INDEXED.hidden_size))
    with pytest.raises(ValueError, match=r"needs a cache that keeps indexer keys: PagedKVCache.create\(\.\.\., "
                                         r"index_head_dim=96\)"):
        DECODE(module, x, PagedKVCache.create(batch_size=1, max_seq_len=64, dtype=jnp.float32))
    with pytest.raises(ValueError, match="the cache keeps 8-dim indexer keys, the config's index_head_dim is 96"):
        DECODE(module, x, PagedKVCache.create(batch_size=1, max_seq_len=64, dtype=jnp.float32, index_head_dim=8))


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------

SPARSE_MODEL = DecoderConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=3,
                             q_lora_rank=24, qk_nope_head_dim=32, v_head_dim=24, index_topk=5, index_n_heads=4,
                             index_head_dim=80)


def test_sparse_generation_matches_full_recompute():
    """Greedy generation with prompts longer than topk: cached decode through the indexer equals the full causal
    forward (prefill under the indexer's mask) over prompt + generated tokens."""
    model = build_model(SPARSE_MODEL, seed=0)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 60, 17)]  # 60 + 8 crosses a page boundary
    result = generate(model, prompts, 8)
    want = recompute_logits(model, prompts, result.tokens)
    np.testing.assert_allclose(result.logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert result.cache.index_pages.shape == (2, 3 * 2, 64, 1, 80)


def test_sparse_generation_reads_an_fp8_cache():
    model = build_model(SPARSE_MODEL, seed=0)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9]]
    full = generate(model, prompts, 4)
    fp8 = generate(model, prompts, 4, cache_dtype=jnp.float8_e4m3fn)
    assert fp8.cache.is_fp8 and fp8.cache.index_pages.dtype == SPARSE_MODEL.dtype
    scale = np.abs(full.logits).max()
    err = np.abs(fp8.logits[:, 0] - full.logits[:, 0]).max()  # the first token comes from the prefill: same
    assert err < 1e-5 * scale, err
    # The first decode step is fed the same token; it reads FP8-rounded latents (later steps may pick other tokens).
    err = np.abs(fp8.logits[:, 1] - full.logits[:, 1]).max()
    assert 0 < err < 0.05 * scale, err
