"""The tiny decoder: cached generation equals recompute, one metadata per step, real donation, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flashmla import mla_module, model as model_lib
from jax_flashmla.model import (
    DecoderConfig,
    build_model,
    generate,
    make_decode_step,
    recompute_logits,
)

TINY = DecoderConfig(
    vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=3, q_lora_rank=24,
    qk_nope_head_dim=32, v_head_dim=24,
)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(TINY, seed=0)


def random_prompts(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_generation_matches_full_recompute(tiny_model):
    lengths = [3, 60, 17]  # the 60-token prompt crosses the 64-token page boundary while decoding
    prompts = random_prompts(lengths, TINY.vocab_size)
    steps = 9
    result = generate(tiny_model, prompts, steps)

    assert result.tokens.shape == (3, steps) and result.logits.shape == (3, steps, TINY.vocab_size)
    assert len(result.step_seconds) == steps - 1
    np.testing.assert_array_equal(result.tokens, result.logits.argmax(-1))  # greedy took the argmax
    # every generated token but the last went into the cache
    np.testing.assert_array_equal(result.cache.seqlens, np.array(lengths) + steps - 1)

    reference = recompute_logits(tiny_model, prompts, result.tokens)
    scale = np.abs(reference).max()
    assert scale > 0.1  # non-trivial logits
    np.testing.assert_allclose(result.logits, reference, atol=1e-4 * scale, rtol=0)
    # the logits change from step to step, so the comparison covers distinct decode positions
    assert np.abs(np.diff(reference, axis=1)).max() > 1e-2 * scale


def test_multi_token_decode_matches_full_forward(tiny_model):
    """model.decode with s_q = 2 new tokens per sequence (causal among them) vs the no-cache forward."""
    lengths = np.array([5, 62], np.int32)
    tokens = np.array(random_prompts([66, 66], TINY.vocab_size, seed=3), np.int32)
    cache = tiny_model.new_cache(2, 80)
    prompt = jnp.asarray(tokens[:, :62])

    @nnx.jit
    def prefill_then_decode(model, cache, new_tokens):
        _, cache = model.prefill(prompt, jnp.asarray(lengths), cache)
        return model.decode(new_tokens, cache)

    new_tokens = np.stack([tokens[i, n : n + 2] for i, n in enumerate(lengths)])
    logits, cache = prefill_then_decode(tiny_model, cache, jnp.asarray(new_tokens))
    full = nnx.jit(lambda model, t, n: model(t, n))(tiny_model, jnp.asarray(tokens), jnp.asarray(lengths + 2))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i], full[i, n : n + 2], atol=1e-4 * float(jnp.abs(full).max()))
    np.testing.assert_array_equal(cache.seqlens, lengths + 2)


def test_scheduler_metadata_is_computed_once_per_step_and_reaches_every_layer(tiny_model, monkeypatch):
    metadata_calls, kernel_metadata = [], []
    real_metadata, real_kernel = model_lib.get_mla_metadata, mla_module.flash_mla_with_kvcache

    def counting_metadata(*args, **kwargs):
        out = real_metadata(*args, **kwargs)
        metadata_calls.append(out)
        return out

    def recording_kernel(*args, tile_scheduler_metadata=None, num_splits=None, **kwargs):
        kernel_metadata.append((tile_scheduler_metadata, num_splits))
        return real_kernel(*args, tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits, **kwargs)

    monkeypatch.setattr(model_lib, "get_mla_metadata", counting_metadata)
    monkeypatch.setattr(mla_module, "flash_mla_with_kvcache", recording_kernel)
    cache = tiny_model.new_cache(2, 16)
    graphdef, state = nnx.split(tiny_model)
    # Tracing one decode step is enough to see which calls it makes (and much faster than running it).
    jax.eval_shape(lambda s, c, t: nnx.merge(graphdef, s).decode(t, c), state, cache, jnp.ones((2, 1), jnp.int32))

    assert len(metadata_calls) == 1
    assert len(kernel_metadata) == TINY.num_layers
    for md, splits in kernel_metadata:
        assert md is metadata_calls[0][0] and splits is metadata_calls[0][1]


def test_decode_step_donates_and_reuses_the_cache_buffer(tiny_model):
    prompts = random_prompts([4, 9], TINY.vocab_size)
    warm = generate(tiny_model, prompts, 2)  # prefill + one step: a cache with content
    cache, tokens = warm.cache, jnp.asarray(warm.tokens[:, -1])
    step = make_decode_step(tiny_model)

    for _ in range(2):
        pointer = cache.pages.unsafe_buffer_pointer()
        seqlens = np.asarray(cache.seqlens)
        old = cache
        tokens, _, cache = step(cache, tokens, jax.random.key(0))
        assert old.pages.is_deleted(), "the donated pool must be consumed"
        with pytest.raises(RuntimeError, match="deleted|donated"):
            np.asarray(old.pages)
        assert cache.pages.unsafe_buffer_pointer() == pointer, "XLA should write the new pool in place"
        np.testing.assert_array_equal(cache.seqlens, seqlens + 1)


def test_top_k_sampling_draws_from_the_top_k(tiny_model):
    prompts = random_prompts([6, 6, 6, 6], TINY.vocab_size, seed=5)
    a = generate(tiny_model, prompts, 6, top_k=5, temperature=2.0, seed=1)
    b = generate(tiny_model, prompts, 6, top_k=5, temperature=2.0, seed=1)
    c = generate(tiny_model, prompts, 6, top_k=5, temperature=2.0, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # seeded
    assert not np.array_equal(a.tokens, c.tokens)
    ranks = (a.logits > np.take_along_axis(a.logits, a.tokens[..., None], -1)).sum(-1)
    assert ranks.max() < 5  # every sampled token is among its step's top 5
    assert ranks.max() > 0  # and sampling did not just take the argmax


def test_same_seed_same_weights_different_seed_different_weights():
    small = DecoderConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, q_lora_rank=None
    )
    leaves = [jax.tree_util.tree_leaves(nnx.state(build_model(small, seed=s), nnx.Param)) for s in (0, 0, 1)]
    assert all(np.array_equal(x, y) for x, y in zip(leaves[0], leaves[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves[0], leaves[2]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(kv_lora_rank=256), "kv_lora_rank=512"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_heads=0), "num_heads"),
    ],
)
def test_bad_decoder_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**bad)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[1, 2], []], {}, "at least one token"),
        ([[1, 200]], {}, "prompt tokens"),
        ([], {}, "at least one prompt"),
        ([[1]], dict(top_k=0), "top_k"),
        ([[1]], dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_generation_arguments_raise(tiny_model, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, prompts, 3, **kwargs)
