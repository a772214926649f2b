"""reference.py (the executable spec) and the public API's reference lowering against the float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla.reference import mla_decode_reference

from cases import UNUSED_PAGE_ID, make_problem
from oracle import decode_oracle, problem_oracle
from tolerances import assert_lse_close, assert_out_close

CASES = [  # batch, s_q, h_q, h_kv, lengths, causal
    (3, 1, 4, 1, [70, 0, 129], False),
    (2, 2, 4, 2, [1, 65], True),
    (2, 4, 2, 1, [3, 130], True),  # query 0 of sequence 0 sees nothing: out 0, lse +inf
    (1, 3, 8, 2, [200], False),
]


@pytest.mark.parametrize("batch,s_q,h_q,h_kv,seqlens,causal", CASES)
@pytest.mark.parametrize("head_dim", [576, 512])
def test_reference_matches_float64_oracle(batch, s_q, h_q, h_kv, seqlens, causal, head_dim, rng_seed):
    rng = np.random.default_rng([rng_seed, batch, s_q, h_q, head_dim])
    p = make_problem(rng, batch=batch, s_q=s_q, h_q=h_q, h_kv=h_kv, seqlens=np.array(seqlens, np.int32),
                     dtype=jnp.float32, head_dim=head_dim)
    scale = 0.7 * head_dim**-0.5
    out, lse = jax.jit(lambda *a: mla_decode_reference(*a, head_dim_v=512, softmax_scale=scale, causal=causal))(
        p.q, p.k_cache, p.block_table, p.cache_seqlens)
    want_out, want_lse = problem_oracle(p, causal, scale)
    assert_out_close(out, want_out, jnp.float32)
    assert_lse_close(lse, want_lse)


def test_hostile_values_follow_the_spec(rng_seed):
    """Length past the table clips to its capacity; negative length is empty; bad page ids are ignored."""
    rng = np.random.default_rng(rng_seed)
    p = make_problem(rng, batch=4, s_q=2, h_q=4, h_kv=1, seqlens=np.array([128, 130, 64, 10], np.int32),
                     dtype=jnp.float32, spare_pages=0)
    table = np.asarray(p.block_table).copy()
    table[1, 1], table[2, 0] = -7, UNUSED_PAGE_ID
    seqlens = np.array([10_000, 130, 64, -5], np.int32)
    for causal in (False, True):
        out, lse = jfm.flash_mla_with_kvcache(p.q, p.k_cache, jnp.asarray(table), jnp.asarray(seqlens), 512,
                                              causal=causal)
        want_out, want_lse = decode_oracle(p.q, np.nan_to_num(np.asarray(p.k_cache), nan=1e30), table, seqlens,
                                           512, 576**-0.5, causal)
        assert_out_close(out, want_out, jnp.float32)
        assert_lse_close(lse, want_lse)
    assert np.all(np.asarray(out[2]) == 0) and np.all(np.isposinf(np.asarray(lse[2])))  # its only page is bad


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_public_api_half_precision_under_jit(dtype, rng_seed):
    rng = np.random.default_rng(rng_seed)
    p = make_problem(rng, batch=3, s_q=2, h_q=8, h_kv=1, seqlens=np.array([100, 0, 64], np.int32), dtype=dtype)

    @jax.jit
    def step(q, k_cache, table, seqlens):
        md, splits = jfm.get_mla_metadata(seqlens, 2 * 8, 1)
        return jfm.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, md, splits, causal=True)

    out, lse = step(p.q, p.k_cache, p.block_table, p.cache_seqlens)
    assert out.dtype == dtype and out.shape == (3, 2, 8, 512) and lse.dtype == jnp.float32
    want_out, want_lse = problem_oracle(p, True)
    assert_out_close(out, want_out, dtype)
    assert_lse_close(lse, want_lse)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_sink_matches_the_oracle(dtype, rng_seed):
    """The sink as the oracle writes it (one more key, zero value, outside lse) against the API's epilogue, with
    sinks of -inf (no effect), +inf (zero output), a large one and ordinary ones, and an empty sequence."""
    rng = np.random.default_rng(rng_seed)
    p = make_problem(rng, batch=3, s_q=2, h_q=6, h_kv=2, seqlens=np.array([100, 0, 64], np.int32), dtype=dtype)
    sink = np.array([-np.inf, np.inf, 40.0, 0.3, -1.5, 2.0], np.float32)
    want_out, want_lse = problem_oracle(p, True, attn_sink=sink)
    out, lse = jax.jit(lambda *a: jfm.flash_mla_with_kvcache(*a, 512, causal=True, attn_sink=jnp.asarray(sink)))(
        p.q, p.k_cache, p.block_table, p.cache_seqlens)
    assert out.dtype == dtype
    assert_out_close(out, want_out, dtype)
    assert_lse_close(lse, want_lse)
    out = np.asarray(out, np.float32)
    plain, _ = jfm.flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512, causal=True)
    np.testing.assert_array_equal(out[:, :, 0], np.asarray(plain, np.float32)[:, :, 0])  # -inf: untouched
    assert np.all(out[:, :, 1] == 0) and np.all(out[1] == 0)  # +inf zeroes; the empty sequence stays 0
    assert np.abs(out[0, :, 2]).max() < 1e-6 < np.abs(out[0, :, 3]).max()  # a sink far above every score


def test_attention_sink_positional_vmap_and_gradient(rng_seed):
    """attn_sink in FlashMLA's position (the twelfth argument), under vmap (mapped and not), and its gradient:
    finite for a sink of +inf beside a query that saw no key."""
    rng = np.random.default_rng(rng_seed)
    p = make_problem(rng, batch=2, s_q=1, h_q=4, h_kv=1, seqlens=np.array([90, 0], np.int32), dtype=jnp.float16)
    args = (p.q, p.k_cache, p.block_table, p.cache_seqlens, 512)
    sink = jnp.asarray([np.inf, -np.inf, 0.5, -2.0], jnp.float32)
    by_name = jfm.flash_mla_with_kvcache(*args, attn_sink=sink)
    by_position = jfm.flash_mla_with_kvcache(*args, None, None, None, False, False, None, sink)
    np.testing.assert_array_equal(np.asarray(by_name[0], np.float32), np.asarray(by_position[0], np.float32))

    decode = lambda q, sink: jfm.flash_mla_with_kvcache(q, *args[1:], attn_sink=sink)[0]
    sinks = jnp.stack([sink, sink[::-1]])
    mapped = jax.vmap(decode, in_axes=(None, 0))(p.q, sinks)
    qs = jnp.stack([p.q, p.q[::-1]])
    mapped_q = jax.vmap(decode, in_axes=(0, None))(qs, sink)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(mapped[i], np.float32), np.asarray(decode(p.q, sinks[i]), np.float32))
        np.testing.assert_array_equal(np.asarray(mapped_q[i], np.float32), np.asarray(decode(qs[i], sink), np.float32))

    grad = jax.grad(lambda sink: jnp.sum(decode(p.q, sink).astype(jnp.float32)))(sink)
    assert np.all(np.isfinite(np.asarray(grad))), grad
    assert grad[0] == 0 and grad[1] == 0 and grad[2] != 0  # +inf and -inf sinks: flat
