"""The tiny decoder: cached generation equals recompute, one metadata per step, real donation, sampling;
on a mesh, generation equals the single-device one.

The mesh tests need 4 CPU devices, and XLA_FLAGS only takes effect before JAX starts: in an ordinary run
test_mesh_tests_in_a_4_cpu_device_process re-runs just them (`-k on_a_mesh`) in a subprocess with
--xla_force_host_platform_device_count=4 and carries their verdict; here they skip.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from jax_flashmla import cache as jfm_cache, mla_module, model as model_lib, sharding
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


MESH_DEVICES = 4
on_mesh_devices = pytest.mark.skipif(
    len(jax.devices("cpu")) < MESH_DEVICES, reason="runs in test_mesh_tests_in_a_4_cpu_device_process' subprocess"
)
COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter|"
                        r"collective-broadcast|send|recv)(-start)?\(")  # fmt: skip


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


def test_generation_with_pages_on_demand_equals_the_static_cache(tiny_model):
    """A pool of exactly the pages the rows end with, handed out as they grow: the rows' pages interleave, and
    the tokens and logits are bit for bit those of the static reservation. One page fewer is refused up front."""
    lengths = [3, 60, 17]
    prompts = random_prompts(lengths, TINY.vocab_size, seed=5)
    steps = 9
    want = generate(tiny_model, prompts, steps)
    pages = sum(-(-(n + steps - 1) // 64) for n in lengths)  # 1 + 2 + 1
    got = generate(tiny_model, prompts, steps, num_pages=pages)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.logits, want.logits)
    np.testing.assert_array_equal(got.cache.seqlens, want.cache.seqlens)
    # Page 3 went to row 1 when its decode crossed 64 tokens, after row 2 took page 2 at the prefill.
    np.testing.assert_array_equal(got.cache.block_table[:, :2], [[0, -1], [1, 3], [2, -1]])
    assert int(got.cache.free_count[0]) == 0
    with pytest.raises(ValueError, match=rf"num_pages={pages - 1} is too few: the prompts and new tokens need "
                                         rf"{pages} pages of 64 tokens"):
        generate(tiny_model, prompts, steps, num_pages=pages - 1)


def test_forked_rows_decode_as_the_prompt_decodes_alone(tiny_model):
    """Parallel sampling: one 70-token prompt prefilled into row 0 of an on-demand cache and forked into rows 1-3
    (its full page shared, its partial page copied), then decoded greedily: every row gives the tokens and (up to
    float32 rounding) the logits of the prompt generated alone, and the pool lends 5 pages, not 8."""
    prompt = random_prompts([70], TINY.vocab_size, seed=4)
    steps = 6
    want = generate(tiny_model, prompt, steps)
    cache = tiny_model.new_cache(4, 128, num_pages=8)
    tokens = jnp.asarray(prompt * 4, jnp.int32)
    logits, cache = jax.jit(tiny_model.prefill)(tokens, jnp.array([70, 0, 0, 0]), cache)
    cache, granted = cache.fork(jnp.array([-1, 0, 0, 0]))
    assert granted.tolist() == [True] * 4 and cache.seqlens.tolist() == [70] * 4
    logits = jnp.broadcast_to(logits[:1], logits.shape)  # rows 1-3 prefilled nothing: they take row 0's logits
    decode = jax.jit(tiny_model.decode)
    got_tokens, got_logits = [], []
    for _ in range(steps):
        next_tokens = jnp.argmax(logits.reshape(4, -1), axis=-1).astype(jnp.int32)
        got_tokens.append(next_tokens)
        got_logits.append(logits.reshape(4, -1))
        logits, cache = decode(next_tokens[:, None], cache)
    got_tokens, got_logits = np.stack(got_tokens, axis=1), np.stack(got_logits, axis=1)
    for row in range(4):  # the rows alike bit for bit; the batch of one row (its own matmul shapes) closely
        np.testing.assert_array_equal(got_tokens[row], want.tokens[0])
        np.testing.assert_array_equal(got_logits[row], got_logits[0])
    np.testing.assert_allclose(got_logits[0], want.logits[0], atol=1e-5 * np.abs(want.logits).max(), rtol=0)
    assert int(cache.free_count[0]) == 8 - 5 and cache.seqlens.tolist() == [76] * 4


def test_a_step_the_pool_cannot_serve_leaves_its_row_where_it_was(tiny_model):
    """model.decode reserves the step's pages; a row refused stays at its length, the others advance."""
    cache = tiny_model.new_cache(2, 128, num_pages=3)
    tokens = jnp.asarray(random_prompts([64, 64], TINY.vocab_size, seed=2), jnp.int32)
    _, cache = tiny_model.prefill(tokens, jnp.array([64, 64], jnp.int32), cache)  # one page each, one page left
    assert cache.seqlens.tolist() == [64, 64] and int(cache.free_count[0]) == 1
    _, cache = tiny_model.decode(tokens[:, :1], cache)  # both need a second page; row 0 gets the last one
    assert cache.seqlens.tolist() == [65, 64]
    np.testing.assert_array_equal(cache.block_table[:, :2], [[0, 2], [1, -1]])
    # A prefill the pool serves only in part: row 0's 65 tokens take both pages, row 1's 3 find none left.
    _, cache = tiny_model.prefill(tokens[:, :3], jnp.array([3, 3], jnp.int32), tiny_model.new_cache(2, 128, num_pages=1))
    assert cache.seqlens.tolist() == [3, 0]


@pytest.mark.parametrize("num_pages", [None, 4])
def test_rows_left_out_of_a_step_stay_as_they_were(tiny_model, num_pages):
    """decode(..., active=): row 1 sits out two steps (its length, its pages and the free stack stay), row 0's
    logits are bit for bit those of steps where both rows take part."""
    tokens = jnp.asarray(random_prompts([70, 70], TINY.vocab_size, seed=6), jnp.int32)
    runs = []
    for active in (None, jnp.array([True, False])):
        cache = tiny_model.new_cache(2, 128, num_pages=num_pages)
        _, cache = tiny_model.prefill(tokens[:, :63], jnp.array([63, 20], jnp.int32), cache)
        before = cache
        logits = []
        for t in range(63, 65):  # row 0 takes its second page at the second step
            step, cache = tiny_model.decode(tokens[:, t : t + 1], cache, active=active)
            logits.append(step[0])
        runs.append((np.stack(logits), cache, before))
    (want, _, _), (got, cache, before) = runs
    np.testing.assert_array_equal(got, want)
    assert cache.seqlens.tolist() == [65, 20]
    np.testing.assert_array_equal(cache.block_table[1], before.block_table[1])
    if num_pages:
        assert cache.block_table[:, :2].tolist() == [[0, 2], [1, -1]] and int(cache.free_count[0]) == 1
    with pytest.raises(TypeError, match=r"active must be a \(2,\) bool mask, got shape \(2,\) and dtype int32"):
        tiny_model.decode(tokens[:, :1], cache, active=jnp.array([1, 0], jnp.int32))


def test_multi_token_decode_from_pages_on_demand_equals_the_static_cache(tiny_model):
    """s_q = 2 new tokens per row, the second crossing into a page the step reserves."""
    tokens = jnp.asarray(random_prompts([66, 66], TINY.vocab_size, seed=4), jnp.int32)
    lengths = jnp.array([63, 62], jnp.int32)
    logits = []
    for cache in (tiny_model.new_cache(2, 128), tiny_model.new_cache(2, 128, num_pages=4)):
        _, cache = tiny_model.prefill(tokens[:, :63], lengths, cache)
        step, cache = tiny_model.decode(tokens[:, 63:65], cache)
        logits.append(step)
        assert cache.seqlens.tolist() == [65, 64]
    assert cache.block_table.tolist() == [[0, 2], [1, -1]]
    np.testing.assert_array_equal(logits[1], logits[0])


def test_the_pool_check_counts_each_shard():
    model_lib.check_pool_holds(8, 2, np.array([128, 128, 64, 1]))  # shard 0 needs 4 pages, shard 1 needs 2
    with pytest.raises(ValueError, match=r"num_pages=8 is too few: the prompts and new tokens need 5 pages of 64 "
                                         r"tokens in the fullest of 2 shards of 4 pages each \(7 in all\)"):
        model_lib.check_pool_holds(8, 2, np.array([200, 1, 1, 1]))
    with pytest.raises(ValueError, match="divisible by the 2 batch shards"):
        model_lib.check_pool_holds(7, 2, np.array([1, 1]))
    with pytest.raises(ValueError, match=r"page_shards=2 is for pages on demand: pass num_pages= too"):
        build_model(TINY).new_cache(2, 128, page_shards=2)


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


def test_prefill_clips_lengths_outside_the_prompt(tiny_model):
    """Lengths are clipped to [0, s]: a length past the prompt stores and advances by s, an empty or negative one
    stores nothing; every row's logits stay finite, and a clipped row's equal its in-range twin's (every row holds
    the same prompt)."""
    tokens = jnp.asarray(np.array(random_prompts([6], TINY.vocab_size, seed=5) * 4, np.int32))
    prefill = nnx.jit(lambda model, lengths, cache: model.prefill(tokens, lengths, cache))
    logits, cache = prefill(tiny_model, jnp.array([9, 0, -2, 6], jnp.int32), tiny_model.new_cache(4, 64))
    np.testing.assert_array_equal(cache.seqlens, [6, 0, 0, 6])
    assert np.all(np.isfinite(np.asarray(logits)))
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[3]))  # 9 clipped to 6
    np.testing.assert_array_equal(np.asarray(logits[1]), np.asarray(logits[2]))  # 0 and -2: nothing stored
    stored = np.abs(np.asarray(cache.pages, np.float32)).sum(axis=(0, 2, 3, 4))  # per page, every layer
    table = np.asarray(cache.block_table)
    assert stored[table[1]].sum() == stored[table[2]].sum() == 0 and stored[table[0, 0]] > 0


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


# --- on a mesh -----------------------------------------------------------------------------------------------


def test_mesh_tests_in_a_4_cpu_device_process():
    if len(jax.devices("cpu")) >= MESH_DEVICES:
        pytest.skip("this process has the devices: the mesh tests run here directly")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    flag = f"--xla_force_host_platform_device_count={MESH_DEVICES}"
    env.update(XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {flag}".strip(), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__), "-k", "on_a_mesh"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, report


MESH_CONFIG = dataclasses.replace(TINY, num_layers=2, num_heads=4)  # heads that split over model=2 or 4
# the 60-token prompt crosses the 64-token page boundary while decoding
MESH_PROMPTS = random_prompts([3, 60, 17, 9], MESH_CONFIG.vocab_size, seed=7)


@pytest.fixture(scope="module")
def unsharded_generation():
    return generate(build_model(MESH_CONFIG, seed=1), MESH_PROMPTS, 5)


@on_mesh_devices
@pytest.mark.parametrize("flag", ["data=2,model=2", "data=4,model=1"])
def test_sharded_generation_equals_unsharded_on_a_mesh(flag, unsharded_generation, monkeypatch):
    """Same tokens and logits; the cache ends split over "data"; the FlashMLA calls were partitioned with the
    batch over "data" and (model > 1) the heads over "model"; the only communication of a decode step is the
    documented one after the attention (at most one collective per layer), none at all for model = 1."""
    want = unsharded_generation
    layouts = []  # each mesh is compiled for once, in its own test, so its partitioning decisions land here
    real_layout = sharding.decode_layout
    monkeypatch.setattr(sharding, "decode_layout", lambda *a: layouts.append(real_layout(*a)) or layouts[-1])
    mesh = sharding.mesh_from_flag(flag)
    data, model = mesh.shape["data"], mesh.shape["model"]
    sharded_model = build_model(MESH_CONFIG, seed=1, mesh=mesh)
    assert all(layer.self_attn.mesh is mesh for layer in sharded_model.layers)
    got = generate(sharded_model, MESH_PROMPTS, 5)

    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5 * np.abs(want.logits).max(), rtol=0)
    np.testing.assert_array_equal(got.cache.seqlens, want.cache.seqlens)
    assert got.cache.pages.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 5)
    expected = sharding.DecodeLayout(batch=("data",) if data > 1 else (), heads=("model",) if model > 1 else (),
                                     pool=("data",) if data > 1 else ())  # fmt: skip
    assert layouts and all(layout == expected for layout in layouts), layouts

    step = model_lib.make_decode_step(sharded_model)
    tokens = jax.device_put(jnp.asarray(got.tokens[:, -1]), NamedSharding(mesh, P("data")))
    compiled = step.func.lower(*step.args, got.cache, tokens, jax.random.key(0), **step.keywords).compile()
    collectives = COLLECTIVE.findall(compiled.as_text())
    assert len(collectives) <= (MESH_CONFIG.num_layers if model > 1 else 0), collectives


@on_mesh_devices
@pytest.mark.parametrize("flag", ["data=2,model=2", "data=4,model=1"])
def test_sparse_generation_equals_unsharded_on_a_mesh(flag):
    """DeepSeek-V3.2's indexer and sparse decode on a mesh (its keys' pool split like the latent pool): the same
    tokens and logits as on one device."""
    config = dataclasses.replace(MESH_CONFIG, index_topk=5, index_n_heads=4, index_head_dim=80)
    want = generate(build_model(config, seed=1), MESH_PROMPTS, 4)
    mesh = sharding.mesh_from_flag(flag)
    got = generate(build_model(config, seed=1, mesh=mesh), MESH_PROMPTS, 4)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5 * np.abs(want.logits).max(), rtol=0)
    assert got.cache.index_pages.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 5)


@on_mesh_devices
@pytest.mark.parametrize("flag", ["data=2,model=2", "data=4,model=1"])
def test_on_demand_generation_equals_unsharded_on_a_mesh(flag):
    """Pages handed out on demand from one free stack per batch shard: the same tokens and logits as the static
    cache on one device; each row's pages lie in its own shard; the stacks are split like the rows, and a decode
    step with its page reservation communicates no more than the static one."""
    mesh = sharding.mesh_from_flag(flag)
    data = mesh.shape["data"]
    # 9 steps: the 60-token prompt takes its second page while decoding; the final lengths [11, 68, 25, 17] need
    # 1, 2, 1 and 1 pages: the shard holding row 1 has no page to spare.
    want = generate(build_model(MESH_CONFIG, seed=1), MESH_PROMPTS, 9)
    sharded_model = build_model(MESH_CONFIG, seed=1, mesh=mesh)
    got = generate(sharded_model, MESH_PROMPTS, 9, num_pages={2: 6, 4: 8}[data])
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-5 * np.abs(want.logits).max(), rtol=0)
    cache = got.cache
    assert cache.free_pages.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
    per_shard = cache.free_pages.shape[1]
    np.testing.assert_array_equal(cache.free_count, per_shard - (np.asarray(cache.block_table) >= 0).reshape(
        data, -1).sum(axis=1))
    assert int(cache.free_count[0 if data == 2 else 1]) == 0
    sharding.check_block_table(cache.block_table, cache.pages.shape[1], data)
    table = np.asarray(cache.block_table)
    np.testing.assert_array_equal((table >= 0).sum(axis=1), -(-np.asarray(cache.seqlens) // 64))

    step = model_lib.make_decode_step(sharded_model)
    tokens = jax.device_put(jnp.asarray(got.tokens[:, -1]), NamedSharding(mesh, P("data")))
    compiled = step.func.lower(*step.args, cache, tokens, jax.random.key(0), **step.keywords).compile()
    collectives = COLLECTIVE.findall(compiled.as_text())
    assert len(collectives) <= (MESH_CONFIG.num_layers if mesh.shape["model"] > 1 else 0), collectives

    one_stack = build_model(MESH_CONFIG, seed=1).new_cache(4, 128, num_pages=8)
    with pytest.raises(ValueError, match=f"needs page_shards={data}"):
        sharding.shard_cache(one_stack, mesh)


@on_mesh_devices
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_reserve_and_release_stay_in_their_shards_on_a_mesh(axis_type):
    """reserve, release and append of a cache split over data=2 (a replicated mask and counts beside split rows):
    the single-device results, split as the rows, and under Auto axes with no collective."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    cache = jfm_cache.PagedKVCache.create(batch_size=4, max_seq_len=256, head_dim=8, num_pages=8, on_demand=True,
                                          page_shards=2)

    def steps(cache):
        cache, granted = cache.reserve(jnp.array([70, 1, 130, 5], jnp.int32))
        cache = cache.release(jnp.array([True, False, False, True]))
        return cache.append(jnp.ones((4, 3, 1, 8))), granted

    want, want_granted = jax.jit(steps)(cache)
    with jax.set_mesh(mesh):
        placed = sharding.shard_cache(cache, mesh)
        # Lengths left unplaced (replicated) beside a split table: reserve's per-shard map needs them split alike.
        placed = dataclasses.replace(placed, seqlens=jnp.zeros((4,), jnp.int32))
        compiled = jax.jit(steps).lower(placed).compile()
        got, granted = compiled(placed)
    for name in ("block_table", "seqlens", "free_pages", "free_count"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        if name != "seqlens":  # placed by shard_cache, and kept
            assert getattr(got, name).sharding.spec[0] == "data", name
    np.testing.assert_array_equal(granted, want_granted)
    assert want.block_table.tolist() == [[1, -1, -1, -1], [2, -1, -1, -1], [4, 5, 6, -1], [7, -1, -1, -1]]
    if axis_type == AxisType.Auto:
        assert not COLLECTIVE.findall(compiled.as_text())


@on_mesh_devices
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_fork_copies_within_each_shard_on_a_mesh(axis_type):
    """fork of a cache split over data=2 (3 layers, indexer keys): the single-device tables, lengths, stacks and
    page contents, with no collective: each shard copies its rows' partial pages within its own pages."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    cache = jfm_cache.PagedKVCache.create(batch_size=4, max_seq_len=256, head_dim=8, num_pages=8, on_demand=True,
                                          page_shards=2, num_layers=3, index_head_dim=4)
    cache = cache.append(jnp.arange(4 * 70 * 8, dtype=jnp.float32).reshape(4, 70, 1, 8),
                         num_new=jnp.array([70, 0, 100, 0]), index_keys=jnp.ones((4, 70, 4)))

    def fork(cache):
        return cache.fork(jnp.array([-1, 0, -1, 2], jnp.int32))

    want, want_granted = jax.jit(fork)(cache)
    with jax.set_mesh(mesh):
        placed = sharding.shard_cache(cache, mesh)
        compiled = jax.jit(fork).lower(placed).compile()
        got, granted = compiled(placed)
    for name in ("block_table", "seqlens", "free_pages", "free_count", "pages", "index_pages"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert granted.tolist() == want_granted.tolist() == [True, True, True, True]
    assert got.pages.sharding.spec[1] == "data"
    assert not COLLECTIVE.findall(compiled.as_text())


@on_mesh_devices
def test_batch_must_divide_over_the_data_axis_on_a_mesh():
    model = build_model(MESH_CONFIG, seed=1, mesh=sharding.mesh_from_flag("data=2,model=1"))
    with pytest.raises(ValueError, match=r"the batch \(3\) must divide evenly over the mesh axis 'data' \(2 devices"):
        generate(model, random_prompts([4, 5, 6], MESH_CONFIG.vocab_size), 2)


def test_heads_must_divide_over_the_model_axis():
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide evenly over the mesh axis 'model' \(2 devices"):
        build_model(TINY, mesh=AbstractMesh((1, 2), ("data", "model")))
