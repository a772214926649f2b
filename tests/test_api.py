"""The primitives inside jax transformations, and the CUDA lowering (inspected from a CPU machine)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params
import pytest

import jax_flashmla as jfm

from cases import make_problem
from tolerances import assert_lse_close, assert_out_close


def small_problem(rng, dtype=jnp.float32, batch=3, s_q=2):
    return make_problem(rng, batch=batch, s_q=s_q, h_q=4, h_kv=1, seqlens=rng.integers(0, 200, batch).astype(np.int32),
                        dtype=dtype)


def decode(q, k_cache, table, seqlens):
    return jfm.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, causal=True)


def test_vmap_equals_per_element(rng_seed):
    """vmap over q, page pools (per layer), tables and lengths, folded into one call."""
    rng = np.random.default_rng(rng_seed)
    problems = [small_problem(rng) for _ in range(3)]
    width = max(p.block_table.shape[1] for p in problems)
    pad = lambda t: jnp.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=-1)
    pool_size = max(p.k_cache.shape[0] for p in problems)
    pools = jnp.stack([jnp.pad(p.k_cache, ((0, pool_size - p.k_cache.shape[0]), (0, 0), (0, 0), (0, 0)))
                       for p in problems])
    args = (jnp.stack([p.q for p in problems]), pools, jnp.stack([pad(p.block_table) for p in problems]),
            jnp.stack([p.cache_seqlens for p in problems]))
    out, lse = jax.jit(jax.vmap(decode))(*args)
    for i, p in enumerate(problems):
        want_out, want_lse = decode(p.q, p.k_cache, p.block_table, p.cache_seqlens)
        assert_out_close(out[i], want_out, jnp.float32)
        assert_lse_close(lse[i], want_lse)


def test_vmap_with_shared_cache_and_in_axes(rng_seed):
    rng = np.random.default_rng(rng_seed)
    p = small_problem(rng)
    qs = jnp.stack([p.q, 2 * p.q], axis=2)  # mapped axis in the middle
    out, _ = jax.vmap(decode, in_axes=(2, None, None, None))(qs, p.k_cache, p.block_table, p.cache_seqlens)
    for i in range(2):
        assert_out_close(out[i], decode(qs[:, :, i], p.k_cache, p.block_table, p.cache_seqlens)[0], jnp.float32)


def stacked_problem(rng, num_layers=3):
    """A problem and a stack of pools made from its pool, each layer rescaled and with its own fresh noise."""
    p = small_problem(rng)
    scales = jnp.asarray(rng.uniform(0.5, 2.0, num_layers), jnp.float32)[:, None, None, None, None]
    noise = jnp.asarray(rng.standard_normal((num_layers, *p.k_cache.shape)) / 10, jnp.float32)
    return p, (p.k_cache[None] * scales + noise).astype(p.k_cache.dtype)


def test_stacked_pool_equals_its_layer(rng_seed):
    """k_cache (L, P, 64, h_kv, d) with layer=l is the decode of pool[l]: static, traced (jit, scan), vmap."""
    p, pools = stacked_problem(np.random.default_rng(rng_seed))
    args = (p.block_table, p.cache_seqlens, 512)
    want = [decode(p.q, pools[layer], p.block_table, p.cache_seqlens) for layer in range(pools.shape[0])]
    for layer in range(pools.shape[0]):
        got = jax.jit(lambda q, pools, layer=layer: jfm.flash_mla_with_kvcache(q, pools, *args, causal=True,
                                                                               layer=layer))(p.q, pools)
        assert_same_decode(got, want[layer])
        traced = jax.jit(lambda q, pools, l: jfm.flash_mla_with_kvcache(q, pools, *args, causal=True, layer=l))
        assert_same_decode(traced(p.q, pools, jnp.int32(layer)), want[layer])
    assert_same_decode(traced(p.q, pools, jnp.int32(-1)), want[0])

    def over_layers(q, pools):
        step = lambda _, layer: (None, jfm.flash_mla_with_kvcache(q, pools, *args, causal=True, layer=layer))
        return jax.lax.scan(step, None, jnp.arange(pools.shape[0], dtype=jnp.int32))[1]

    scanned = jax.jit(over_layers)(p.q, pools)
    for layer in range(pools.shape[0]):
        assert_same_decode((scanned[0][layer], scanned[1][layer]), want[layer])

    # vmap over queries with the stack shared, and over stacks of stacks (each read at the same layer).
    qs = jnp.stack([p.q, -p.q])
    shared = jax.vmap(lambda q: jfm.flash_mla_with_kvcache(q, pools, *args, causal=True, layer=1))(qs)
    mapped = jax.vmap(lambda q, pools: jfm.flash_mla_with_kvcache(q, pools, *args, causal=True, layer=1))(
        qs, jnp.stack([pools, pools[::-1]]))
    for i, (q, stack) in enumerate(((p.q, pools), (-p.q, pools[::-1]))):
        assert_same_decode((shared[0][i], shared[1][i]), decode(q, pools[1], p.block_table, p.cache_seqlens))
        assert_same_decode((mapped[0][i], mapped[1][i]), decode(q, stack[1], p.block_table, p.cache_seqlens))
    # vmap over the layer index itself; out-of-range traced indices clamp into [0, L), as the kernels clamp them:
    # -1 reads layer 0, not the last one (which a jnp index, and lax.dynamic_index_in_dim, would wrap it to).
    indices = jnp.array([2, 0, 7, -3, -1], jnp.int32)
    by_layer = jax.vmap(lambda i: jfm.flash_mla_with_kvcache(p.q, pools, *args, causal=True, layer=i))(indices)
    for i, layer in enumerate((2, 0, 2, 0, 0)):
        assert_same_decode((by_layer[0][i], by_layer[1][i]), want[layer])


def assert_same_decode(got, want):
    assert_out_close(got[0], want[0], jnp.float32)
    assert_lse_close(got[1], want[1])


def test_metadata_under_vmap_equals_loop():
    seqlens = jnp.array([[5, 700, 0], [64, 65, 3000]], jnp.int32)
    md, splits = jax.vmap(lambda s: jfm.get_mla_metadata(s, 16, 1))(seqlens)
    for i in range(2):
        want_md, want_splits = jfm.get_mla_metadata(seqlens[i], 16, 1)
        np.testing.assert_array_equal(md[i], want_md)
        np.testing.assert_array_equal(splits[i], want_splits)


def metadata_charges(fn, *args):
    """The split_overhead of every schedule the traced program computes (nested jaxprs included)."""
    charges = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is jfm.primitives.mla_metadata_p:
                charges.append(eqn.params["split_overhead"])
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return charges


@pytest.mark.parametrize("h_q,s_q,charge", [(4, 2, 2), (16, 2, 2), (32, 1, 2), (16, 4, 5), (128, 2, 5)])
def test_each_schedule_charges_the_kernel_of_its_query_rows(h_q, s_q, charge):
    """Head groups of at most 32 query rows are the narrow kernel's: every schedule of their decode charges its
    splits 2 blocks, wider ones 5, whether get_mla_metadata made it, the decode made it in the call, or vmap's
    batching rule remade it for the folded batch."""
    rng = np.random.default_rng([h_q, s_q])
    p = make_problem(rng, batch=3, s_q=s_q, h_q=h_q, h_kv=1, seqlens=rng.integers(1, 300, 3).astype(np.int32),
                     dtype=jnp.float32)

    def scheduled_first(q, k_cache, table, seqlens):
        md, splits = jfm.get_mla_metadata(seqlens, s_q * h_q, 1)
        return jfm.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, md, splits)

    args = (p.q, p.k_cache, p.block_table, p.cache_seqlens)
    assert metadata_charges(scheduled_first, *args) == [charge]
    assert metadata_charges(decode, *args) == [charge]
    stacked = [jnp.stack([x, x]) for x in args]
    assert set(metadata_charges(jax.vmap(scheduled_first), *stacked)) == {charge}


def test_eager_equals_jit(rng_seed):
    p = small_problem(np.random.default_rng(rng_seed))
    eager = decode(p.q, p.k_cache, p.block_table, p.cache_seqlens)
    jitted = jax.jit(decode)(p.q, p.k_cache, p.block_table, p.cache_seqlens)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


needs_extension = pytest.mark.skipif(not jfm.kernels_available(),
                                     reason=f"CUDA extension not built: {jfm.why_kernels_unavailable()}")


@needs_extension
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cuda_lowering_emits_the_ffi_calls(dtype):
    args = (jax.ShapeDtypeStruct((2, 2, 16, 576), dtype), jax.ShapeDtypeStruct((9, 64, 1, 576), dtype),
            jax.ShapeDtypeStruct((2, 5), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))

    def step(q, k_cache, table, seqlens):
        md, splits = jfm.get_mla_metadata(seqlens, 32, 1, num_sms=132)
        return jfm.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, md, splits, softmax_scale=0.125,
                                          causal=True)

    text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 2, calls
    assert "@jax_flashmla_mla_metadata" in calls[0] and "tensor<132x8xi32>" in calls[0]
    decode_call = calls[1]
    assert "@jax_flashmla_mla_decode" in decode_call
    assert "causal = true" in decode_call and "softmax_scale = 1.250000e-01 : f32" in decode_call
    assert "poison_outputs = false" in decode_call
    # XLA allocates the split-KV partials: (b + num_parts, h_kv, q_rows, 512) and (b + num_parts, h_kv, q_rows).
    assert "tensor<134x1x32x512xf32>" in decode_call and "tensor<134x1x32xf32>" in decode_call


@needs_extension
@pytest.mark.parametrize("layer", ["static", "traced"])
def test_cuda_lowering_reads_a_stacked_pool_in_place(layer):
    """With a stacked pool the whole pool and the layer index (an int32 scalar) are the custom call's operands:
    no slice of the pool, so nothing depends on XLA passing a slice without copying it. A traced index (a
    scan over layers) stays an operand too."""
    q, pools = jax.ShapeDtypeStruct((2, 1, 16, 576), jnp.bfloat16), jax.ShapeDtypeStruct((4, 9, 64, 1, 576), jnp.bfloat16)
    table, seqlens = jax.ShapeDtypeStruct((2, 5), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)

    def step(q, pools, table, seqlens):
        if layer == "static":
            return jfm.flash_mla_with_kvcache(q, pools, table, seqlens, 512, layer=3)
        decode_layer = lambda _, i: (None, jfm.flash_mla_with_kvcache(q, pools, table, seqlens, 512, layer=i))
        return jax.lax.scan(decode_layer, None, jnp.arange(4, dtype=jnp.int32))[1]

    text = jax.jit(step).trace(q, pools, table, seqlens).lower(lowering_platforms=("cuda",)).as_text()
    decode_call, = [line for line in text.splitlines() if "custom_call @jax_flashmla_mla_decode" in line]
    operand_types = decode_call.rsplit(" : (", 1)[1].split(") -> ")[0]
    assert operand_types.split(", ")[1] == "tensor<4x9x64x1x576xbf16>" and operand_types.endswith(", tensor<i32>")
    pool_reads = [line for line in text.splitlines() if ("slice" in line or "gather" in line) and "576" in line]
    assert not pool_reads, pool_reads  # (the scan's own slices move indices and outputs, never the pool)


@needs_extension
def test_cuda_lowering_float32_falls_back_to_reference():
    args = (jax.ShapeDtypeStruct((1, 1, 4, 576), jnp.float32), jax.ShapeDtypeStruct((2, 64, 1, 576), jnp.float32),
            jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    text = jax.jit(decode).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "@jax_flashmla_mla_decode" not in text and "@jax_flashmla_mla_metadata" in text


@needs_extension
def test_export_for_cuda_and_cpu(rng_seed):
    """jax.export for cuda needs this package's custom calls allowed (export_disabled_checks); the artifact for
    ("cpu", "cuda") holds both custom calls and runs here on the CPU, matching the jitted function."""
    from jax import export

    shapes = (jax.ShapeDtypeStruct((2, 1, 16, 576), jnp.bfloat16), jax.ShapeDtypeStruct((8, 64, 1, 576), jnp.bfloat16),
              jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
    step = jax.jit(decode)
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees"):
        export.export(step, platforms=("cuda",))(*shapes)
    exported = export.export(step, platforms=("cpu", "cuda"), disabled_checks=jfm.export_disabled_checks())(*shapes)
    module = exported.mlir_module()
    assert module.count("custom_call @jax_flashmla_mla_metadata") == 1
    assert module.count("custom_call @jax_flashmla_mla_decode") == 1
    p = make_problem(np.random.default_rng(rng_seed), batch=2, s_q=1, h_q=16, h_kv=1,
                     seqlens=np.array([130, 7], np.int32), dtype=jnp.bfloat16, spare_pages=0)
    args = (p.q, jnp.pad(p.k_cache, ((0, 8 - p.k_cache.shape[0]),) + ((0, 0),) * 3),
            jnp.pad(p.block_table, ((0, 0), (0, 4 - p.block_table.shape[1])), constant_values=-1), p.cache_seqlens)
    for got, want in zip(exported.call(*args), step(*args)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_gpus_other_than_hopper_get_the_reference(monkeypatch):
    from types import SimpleNamespace

    from jax_flashmla import _extension

    hopper, ampere = SimpleNamespace(compute_capability="9.0"), SimpleNamespace(compute_capability="8.0")
    assert _extension.unsupported_gpus([hopper, hopper]) is None
    assert _extension.unsupported_gpus([SimpleNamespace()]) is None  # reports nothing: assumed able
    message = _extension.unsupported_gpus([hopper, ampere])
    assert "built for compute capability 9.0" in message and "GPUs have 8.0" in message
    if not jfm.kernels_built():
        pytest.skip(f"CUDA extension not built: {jfm.why_kernels_unavailable()}")
    # With such GPUs the cuda lowering emits no custom call: a launch there would fail.
    monkeypatch.setattr(_extension, "_local_gpu_problem", lambda: message)
    assert not jfm.kernels_available() and jfm.why_kernels_unavailable() == message
    args = (jax.ShapeDtypeStruct((1, 1, 4, 576), jnp.bfloat16), jax.ShapeDtypeStruct((2, 64, 1, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    text = jax.jit(decode).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @jax_flashmla" not in text


def test_cpu_lowering_has_no_custom_call():
    args = (jax.ShapeDtypeStruct((1, 1, 4, 576), jnp.bfloat16), jax.ShapeDtypeStruct((2, 64, 1, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    text = jax.jit(decode).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert "custom_call @jax_flashmla" not in text


def test_an_extension_built_from_other_handlers_is_refused(tmp_path):
    """A source checkout imports the installed extension; one built from other FFI handlers (an older install) is
    refused at import with the fix, instead of failing when XLA runs a call whose operands it does not take."""
    import hashlib

    from jax_flashmla._extension import HANDLERS_SOURCE, check_handlers

    source = tmp_path / "handlers.cc"
    source.write_text("// the handlers\n")
    built = hashlib.sha256(source.read_bytes()).hexdigest()
    assert check_handlers(built, source) is None
    assert check_handlers(built, tmp_path / "absent.cc") is None  # an installed package: no source beside it
    for other in ("0" * 64, None):  # other handlers, or an extension too old to say
        message = check_handlers(other, source)
        assert "built from other FFI handlers" in message and "--force-reinstall" in message
    if jfm.kernels_built() and HANDLERS_SOURCE.is_file():  # this checkout's own build
        import _jax_flashmla_cuda

        assert _jax_flashmla_cuda.handlers_sha256() == hashlib.sha256(HANDLERS_SOURCE.read_bytes()).hexdigest()


def test_abi_mismatch_message_names_both_versions():
    from jax_flashmla._extension import check_abi

    assert check_abi("0.11.2", "0.11.2") is None
    message = check_abi("0.11.2", "0.10.2")
    assert "built against jaxlib 0.11.2" in message and "jaxlib 0.10.2 is running" in message
    assert "--no-build-isolation" in message
