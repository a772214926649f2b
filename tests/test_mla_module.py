"""The NNX MLA module against DeepSeek-V3's attention math.

The reference is HF transformers' DeepseekV3Attention (eager, float32) run on the same weights; those tests
need torch + transformers (requirements-hf-test.txt) and are skipped without them. The rest of the file
checks properties that need no reference: RoPE's algebra, prefill == absorbed decode, config errors.
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
from jax_flashmla.mla_module import MLAConfig, MultiHeadLatentAttention
from jax_flashmla.rope import (
    YarnScaling,
    apply_rope,
    mla_softmax_scale,
    rope_attention_factor,
    rope_inv_freq,
    yarn_mscale,
)

# Small but not degenerate: nope != v != rope so any mixed-up split or reshape shows; latent is FlashMLA's 576.
SMALL = dict(hidden_size=64, num_heads=3, kv_lora_rank=512, qk_nope_head_dim=48, qk_rope_head_dim=64, v_head_dim=40)
# DeepSeek-V2-Lite-like YaRN (mscale != mscale_all_dim) so the cos/sin factor is not 1 as well.
YARN_UNEQUAL = YarnScaling(factor=40.0, mscale=0.707, mscale_all_dim=1.0)


def small_config(q_lora_rank=None, yarn=YarnScaling(), **overrides):
    return MLAConfig(**{**SMALL, "q_lora_rank": q_lora_rank, "yarn": yarn, **overrides})


# Jitted entry points: run eagerly, every op of the module would compile on its own (seconds on 2 cores).
PREFILL = nnx.jit(MultiHeadLatentAttention.prefill, static_argnames=("layer",))
DECODE = nnx.jit(MultiHeadLatentAttention.decode, static_argnames=("layer",))


@functools.partial(nnx.jit, static_argnums=0)
def _init_module(config, seed):
    return MultiHeadLatentAttention(config, rngs=nnx.Rngs(jax.random.key(seed)))


def new_module(config, seed=0):
    return _init_module(config, jnp.asarray(seed, jnp.uint32))


def random_module(config, seed=0):
    module = new_module(config, seed)
    # Norm weights start at 1; make them random so the tests see whether they are applied.
    key = jax.random.key(seed + 100)
    for norm in [module.kv_a_layernorm] + ([module.q_a_layernorm] if config.q_lora_rank else []):
        key, sub = jax.random.split(key)
        norm.weight[...] = jax.random.uniform(sub, norm.weight[...].shape, minval=0.5, maxval=1.5)
    return module


def _pad(rows, width):
    """list of (len_i, d) arrays -> (b, width, d) right-padded with noise (padding must not leak)."""
    rng = np.random.default_rng(123)
    out = rng.standard_normal((len(rows), width, rows[0].shape[-1])).astype(np.float32) * 7
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return jnp.asarray(out)


# --------------------------------------------------------------------------------------------------------
# RoPE / YaRN
# --------------------------------------------------------------------------------------------------------


def test_yarn_mscale_formula():
    assert yarn_mscale(1.0, 5.0) == 1.0  # no extension, no correction
    assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * np.log(40.0) + 1.0)
    # DeepSeek-V3: mscale == mscale_all_dim -> cos/sin untouched, mscale^2 in the softmax scale.
    assert rope_attention_factor(YarnScaling()) == 1.0
    assert mla_softmax_scale(192, YarnScaling()) == pytest.approx(192**-0.5 * (0.1 * np.log(40.0) + 1.0) ** 2)
    assert mla_softmax_scale(192, None) == pytest.approx(192**-0.5)


def test_yarn_keeps_fast_dims_and_interpolates_slow_dims():
    plain = rope_inv_freq(64, 10000.0)
    yarn = rope_inv_freq(64, 10000.0, YarnScaling(factor=40.0))
    assert plain[0] == 1.0 and yarn[0] == 1.0  # fastest dim: untouched
    np.testing.assert_allclose(yarn[-1], plain[-1] / 40.0, rtol=1e-6)  # slowest: fully interpolated
    ratio = yarn / plain
    assert np.all(np.diff(ratio) <= 1e-7), "the ramp goes monotonically from 1 to 1/factor"
    assert np.all((ratio <= 1 + 1e-7) & (ratio >= 1 / 40.0 - 1e-7))


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_is_a_rotation_by_relative_position(interleave):
    inv_freq = rope_inv_freq(64, 10000.0, YarnScaling())
    key = jax.random.key(0)
    q = jax.random.normal(key, (1, 1, 1, 64))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 64))

    def rot(x, pos):
        return apply_rope(x, jnp.array([[pos]]), inv_freq, 1.0, interleave)

    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 1234)), jnp.linalg.norm(q), rtol=1e-5)
    # <R(m) q, R(n) k> depends on m - n only.
    a = jnp.sum(rot(q, 10) * rot(k, 3))
    b = jnp.sum(rot(q, 1007) * rot(k, 1000))
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert not np.allclose(a, jnp.sum(rot(q, 11) * rot(k, 3)), rtol=1e-3)


def test_rope_layouts_differ_by_a_permutation():
    """DeepSeek's interleaved pairs == NeoX halves after de-interleaving the input and output."""
    inv_freq = rope_inv_freq(64, 10000.0)
    x = jax.random.normal(jax.random.key(2), (2, 3, 4, 64))
    pos = jnp.arange(6).reshape(2, 3) * 97
    perm = np.concatenate([np.arange(0, 64, 2), np.arange(1, 64, 2)])  # interleaved -> halves
    inter = apply_rope(x, pos, inv_freq, 1.0, interleave=True)
    halves = apply_rope(x[..., perm], pos, inv_freq, 1.0, interleave=False)
    np.testing.assert_allclose(inter[..., perm], halves, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Config errors
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [dict(num_heads=0), dict(qk_rope_head_dim=63), dict(q_lora_rank=0), dict(hidden_size=-1), dict(rms_norm_eps=0.0),
     dict(rope_theta=1.0)],
)
def test_bad_config_raises(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        small_config(**bad)


def test_bad_yarn_raises():
    with pytest.raises(ValueError, match="beta_fast"):
        YarnScaling(beta_fast=1.0, beta_slow=32.0)


def test_decode_with_unsupported_latent_size_says_why():
    config = small_config(kv_lora_rank=256)
    module = random_module(config)
    cache = PagedKVCache.create(batch_size=1, max_seq_len=8, head_dim=config.latent_dim, dtype=jnp.float32)
    # prefill has no size restriction
    out, _ = PREFILL(module, jnp.ones((1, 4, config.hidden_size)))
    assert out.shape == (1, 4, config.hidden_size)
    with pytest.raises(ValueError, match="kv_lora_rank=512"):
        module.decode(jnp.ones((1, 1, config.hidden_size)), cache)


# --------------------------------------------------------------------------------------------------------
# Self-consistency: plain prefill and absorbed FlashMLA decode are the same function
# --------------------------------------------------------------------------------------------------------


def _prefill_then_decode(module, x_prompt, lengths, new_tokens, capacity):
    """Prefill ragged prompts, then decode each (b, s_q, hidden) chunk of new_tokens; return decode outputs."""
    cache = PagedKVCache.create(
        batch_size=x_prompt.shape[0], max_seq_len=capacity, head_dim=module.config.latent_dim, dtype=jnp.float32
    )
    _, cache = PREFILL(module, x_prompt, lengths, cache)
    cache = cache.advance(lengths)
    outs = []
    for chunk in new_tokens:
        out, cache = DECODE(module, chunk, cache)
        cache = cache.advance(chunk.shape[1])
        outs.append(out)
    return outs, cache


@pytest.mark.parametrize("s_q", [1, 2])
def test_absorbed_decode_equals_plain_prefill(s_q):
    config = small_config(q_lora_rank=32)
    module = random_module(config, seed=1)
    lengths = [4, 63]  # the second sequence's decode crosses the 64-token page boundary
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((n + 2 * s_q, config.hidden_size)).astype(np.float32) for n in lengths]
    x_prompt = _pad([s[:n] for s, n in zip(seqs, lengths)], max(lengths))
    chunks = [
        jnp.asarray(np.stack([s[n + t * s_q : n + (t + 1) * s_q] for s, n in zip(seqs, lengths)])) for t in range(2)
    ]
    outs, cache = _prefill_then_decode(module, x_prompt, jnp.array(lengths, jnp.int32), chunks, capacity=128)
    np.testing.assert_array_equal(cache.seqlens, np.array(lengths) + 2 * s_q)

    full_lengths = np.array(lengths) + 2 * s_q
    full, _ = PREFILL(module, _pad(seqs, max(full_lengths)), jnp.asarray(full_lengths, jnp.int32))
    for i, n in enumerate(lengths):
        for t in range(2):
            expect = full[i, n + t * s_q : n + (t + 1) * s_q]
            np.testing.assert_allclose(outs[t][i], expect, rtol=2e-4, atol=2e-5)


def _prompted_cache(module, dtype, lengths=(9, 70), capacity=128, seed=3):
    """A cache of `dtype` holding random prompts of `lengths`, and the next two tokens of each sequence."""
    config = module.config
    rng = np.random.default_rng(seed)
    x_prompt = jnp.asarray(rng.standard_normal((len(lengths), max(lengths), config.hidden_size)), jnp.float32)
    x_new = jnp.asarray(rng.standard_normal((len(lengths), 2, config.hidden_size)), jnp.float32)
    cache = PagedKVCache.create(batch_size=len(lengths), max_seq_len=capacity, head_dim=576, dtype=dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    _, cache = PREFILL(module, x_prompt, lengths, cache)
    return cache.advance(lengths), x_new


def test_sparse_decode_over_all_positions_equals_dense():
    """topk_positions naming every slot of the cache (its query's later positions are dropped, keeping causal) is
    the dense decode; s_q = 2, so the first new token must not see the second."""
    module = random_module(small_config(q_lora_rank=32), seed=2)
    cache, x_new = _prompted_cache(module, jnp.float32)
    dense, dense_cache = DECODE(module, x_new, cache)
    every = jnp.broadcast_to(jnp.arange(-3, cache.capacity + 5, dtype=jnp.int32), (2, 2, cache.capacity + 8))
    sparse, sparse_cache = DECODE(module, x_new, cache, topk_positions=every)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(sparse_cache.pages), np.asarray(dense_cache.pages))


def test_sparse_decode_reads_only_the_chosen_positions():
    module = random_module(small_config(q_lora_rank=32), seed=4)
    cache, x_new = _prompted_cache(module, jnp.float32)
    rng = np.random.default_rng(5)
    chosen = np.stack([rng.choice(n + 2, size=(2, 6)) for n in (9, 70)]).astype(np.int32)  # (b, s_q, 6)
    chosen[:, 1, 0] = np.array([10, 71])  # the second new token itself
    out, _ = DECODE(module, x_new, cache, topk_positions=jnp.asarray(chosen))
    # NaN in every slot nobody chose (the new tokens' slots are written by the decode before it reads).
    keep = np.zeros(cache.pages.shape[:3], bool)
    table = np.asarray(cache.block_table)
    for i in range(2):
        for t in set(chosen[i].ravel()):
            keep[0, table[i, t // 64], t % 64] = True
    poisoned = jnp.where(jnp.asarray(keep)[..., None, None], cache.pages, jnp.nan)
    again, _ = DECODE(module, x_new, dataclasses.replace(cache, pages=poisoned), topk_positions=jnp.asarray(chosen))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
    assert np.isfinite(np.asarray(out)).all()


def test_fp8_cache_decodes_through_sparse_attention():
    """The V3.2 setting: an FP8 cache (prefill packs the entries) read by sparse decode in bf16; close to the float32
    cache's dense decode up to FP8 and bf16 rounding. Dense decode of an FP8 cache is refused with the way out."""
    module = random_module(dataclasses.replace(small_config(q_lora_rank=32), dtype=jnp.bfloat16), seed=6)
    reference = random_module(small_config(q_lora_rank=32), seed=6)
    nnx.update(module, nnx.state(reference))
    fp8_cache, x_new = _prompted_cache(module, jnp.float8_e4m3fn)
    assert fp8_cache.is_fp8 and fp8_cache.pages.shape[-1] == 656
    f32_cache, _ = _prompted_cache(reference, jnp.float32)
    want, _ = DECODE(reference, x_new, f32_cache)
    every = jnp.broadcast_to(jnp.arange(fp8_cache.capacity, dtype=jnp.int32), (2, 2, fp8_cache.capacity))
    got, new_cache = DECODE(module, x_new.astype(jnp.bfloat16), fp8_cache, topk_positions=every)
    assert got.dtype == jnp.bfloat16 and new_cache.is_fp8
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    assert 0 < err < 0.08 * float(jnp.max(jnp.abs(want))), err
    with pytest.raises(ValueError, match="an FP8 cache is read by sparse attention only: pass topk_positions="):
        module.decode(x_new.astype(jnp.bfloat16), fp8_cache)


# --------------------------------------------------------------------------------------------------------
# Against HF transformers' DeepseekV3Attention
# --------------------------------------------------------------------------------------------------------


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod

    return torch, transformers, hf_mod


def _hf_rope_parameters(yarn):
    if yarn is None:
        return dict(rope_type="default", rope_theta=10000.0)
    return dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=yarn.factor,
        original_max_position_embeddings=yarn.original_max_position_embeddings,
        beta_fast=yarn.beta_fast,
        beta_slow=yarn.beta_slow,
        mscale=yarn.mscale,
        mscale_all_dim=yarn.mscale_all_dim,
    )


def make_hf(config: MLAConfig, seed=0):
    """HF DeepseekV3Attention with random weights (norm weights too) and its rotary embedding."""
    torch, transformers, hf_mod = _hf()
    hf_config = transformers.DeepseekV3Config(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        max_position_embeddings=163840,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=_hf_rope_parameters(config.yarn),
        rope_interleave=config.rope_interleave,
        attention_bias=False,
        num_hidden_layers=1,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    hf = hf_mod.DeepseekV3Attention(hf_config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return hf, hf_mod.DeepseekV3RotaryEmbedding(hf_config)


def make_hf_pair(config: MLAConfig, seed=0):
    """(HF DeepseekV3Attention, its rotary embedding, our module) sharing one set of random weights."""
    hf, rotary = make_hf(config, seed)
    ours = new_module(config, seed)
    for name, p in hf.named_parameters():
        module_name, kind = name.rsplit(".", 1)
        value = jnp.asarray(p.detach().numpy())
        target = getattr(ours, module_name)
        if kind == "weight" and "layernorm" in module_name:
            target.weight[...] = value
        else:  # torch Linear stores (out, in); nnx.Linear's kernel is (in, out)
            target.kernel[...] = value.T
    return hf, rotary, ours


def hf_forward(hf, rotary, x: np.ndarray):
    """One unpadded sequence x (s, hidden) through HF with a causal mask.

    Returns (out (s, hidden), cached c_kv (s, 512), cached k_pe (s, rope)) as numpy.
    """
    torch, transformers, _ = _hf()
    xt = torch.from_numpy(np.asarray(x))[None]
    s = xt.shape[1]
    cos, sin = rotary(xt, torch.arange(s)[None])
    mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)[None, None]
    cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        out, _ = hf(xt, (cos, sin), mask, past_key_values=cache)
    layer = cache.layers[0]
    return out[0].numpy(), layer.keys[0, 0].numpy(), layer.values[0, 0].numpy()


def _deinterleave(k_pe):
    """Our cache keeps DeepSeek's interleaved rope layout; HF's interleave path stores halves."""
    d = k_pe.shape[-1]
    return np.concatenate([k_pe[..., 0:d:2], k_pe[..., 1:d:2]], axis=-1)


def read_cache_entries(cache: PagedKVCache, row: int, count: int, layer: int = 0) -> np.ndarray:
    """The first `count` latent entries of sequence `row`, gathered through its block table."""
    pages = np.asarray(cache.layer_pages(layer))
    table = np.asarray(cache.block_table)[row]
    page_size = pages.shape[1]
    return np.stack([pages[table[p // page_size], p % page_size, 0] for p in range(count)])


def test_rope_tables_match_hf():
    torch, transformers, hf_mod = _hf()
    for yarn in (YarnScaling(), YARN_UNEQUAL, YarnScaling(factor=4.0, original_max_position_embeddings=64), None):
        config = small_config(yarn=yarn)
        hf, rotary = make_hf(config)
        np.testing.assert_allclose(rope_inv_freq(64, 10000.0, yarn), rotary.inv_freq.numpy(), rtol=1e-6)
        assert rope_attention_factor(yarn) == pytest.approx(rotary.attention_scaling)
        assert config.softmax_scale == pytest.approx(hf.scaling)


@pytest.mark.parametrize("q_lora_rank", [None, 32])
@pytest.mark.parametrize("yarn", [YarnScaling(), YARN_UNEQUAL], ids=["deepseek-v3-yarn", "yarn-unequal-mscale"])
def test_prefill_matches_hf(q_lora_rank, yarn):
    config = small_config(q_lora_rank=q_lora_rank, yarn=yarn)
    hf, rotary, ours = make_hf_pair(config, seed=3)
    lengths = [5, 11, 1]
    rng = np.random.default_rng(1)
    seqs = [rng.standard_normal((n, config.hidden_size)).astype(np.float32) for n in lengths]
    cache = PagedKVCache.create(batch_size=3, max_seq_len=80, head_dim=576, dtype=jnp.float32)

    out, cache = PREFILL(ours, _pad(seqs, max(lengths)), jnp.array(lengths, jnp.int32), cache)

    np.testing.assert_array_equal(cache.seqlens, 0)  # prefill writes but the caller advances
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        ref_out, ref_c_kv, ref_k_pe = hf_forward(hf, rotary, seq)
        np.testing.assert_allclose(out[i, :n], ref_out, rtol=1e-4, atol=1e-5)
        entries = read_cache_entries(cache, i, n)
        np.testing.assert_allclose(entries[:, :512], ref_c_kv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_deinterleave(entries[:, 512:]), ref_k_pe, rtol=1e-5, atol=1e-5)
        # nothing written past the prompt
        assert np.all(read_cache_entries(cache, i, n + 1)[n] == 0)


@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("q_lora_rank", [None, 32])
def test_decode_matches_hf(q_lora_rank, s_q):
    config = small_config(q_lora_rank=q_lora_rank)
    hf, rotary, ours = make_hf_pair(config, seed=4)
    lengths = [6, 63]  # the long one crosses the 64-token page boundary while decoding
    steps = 2
    rng = np.random.default_rng(2)
    seqs = [rng.standard_normal((n + steps * s_q, config.hidden_size)).astype(np.float32) for n in lengths]
    x_prompt = _pad([s[:n] for s, n in zip(seqs, lengths)], max(lengths))
    chunks = [
        jnp.asarray(np.stack([s[n + t * s_q : n + (t + 1) * s_q] for s, n in zip(seqs, lengths)]))
        for t in range(steps)
    ]

    outs, cache = _prefill_then_decode(ours, x_prompt, jnp.array(lengths, jnp.int32), chunks, capacity=192)

    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        ref_out, ref_c_kv, ref_k_pe = hf_forward(hf, rotary, seq)  # the whole sequence, no cache
        for t in range(steps):
            np.testing.assert_allclose(
                outs[t][i], ref_out[n + t * s_q : n + (t + 1) * s_q], rtol=1e-4, atol=1e-5, err_msg=f"row {i} step {t}"
            )
        total = n + steps * s_q
        entries = read_cache_entries(cache, i, total)
        np.testing.assert_allclose(entries[:, :512], ref_c_kv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_deinterleave(entries[:, 512:]), ref_k_pe, rtol=1e-5, atol=1e-5)


def test_decode_under_jit_in_bfloat16_stays_close_to_float32():
    """The GPU configuration (bf16 activations and cache) under jit: same answer up to bf16 rounding."""
    config32 = small_config(q_lora_rank=32)
    config16 = dataclasses.replace(config32, dtype=jnp.bfloat16)
    m32 = random_module(config32, seed=5)
    m16 = new_module(config16)
    nnx.update(m16, nnx.state(m32))  # same float32 params; the bf16 module casts them when used

    @nnx.jit
    def run(module, x_prompt, x_new, cache):
        lengths = jnp.array([7, 30], jnp.int32)
        _, cache = module.prefill(x_prompt.astype(module.config.dtype), lengths, cache)
        out, _ = module.decode(x_new.astype(module.config.dtype), cache.advance(lengths))
        return out

    x_prompt = jax.random.normal(jax.random.key(0), (2, 30, config32.hidden_size))
    x_new = jax.random.normal(jax.random.key(1), (2, 2, config32.hidden_size))

    def cache(dtype):
        return PagedKVCache.create(batch_size=2, max_seq_len=64, head_dim=576, dtype=dtype)

    ref = run(m32, x_prompt, x_new, cache(jnp.float32))
    got = run(m16, x_prompt, x_new, cache(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(ref))), err
