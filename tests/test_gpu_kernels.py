"""The CUDA kernels against the float32 reference on FlashMLA's test grid (GPU only)."""

import contextlib
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import scheduler
from jax_flashmla.reference import mla_decode_reference

from cases import INT32_MAX, INT32_MIN, PAGE, UNUSED_PAGE_ID, lengths, make_problem
from oracle import problem_oracle
from tolerances import assert_lse_close, assert_out_close

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _kernels_must_be_there():
    # On a GPU machine missing kernels are a failure, not a skip: the reference would pass for them.
    assert jfm.kernels_available(), jfm.why_kernels_unavailable()


@contextlib.contextmanager
def launch_environment(**variables):
    """Sets JAX_FLASHMLA_DECODE_KERNEL / JAX_FLASHMLA_COMBINE / JAX_FLASHMLA_COMBINE_SLICES (decode_kernel=...,
    combine=..., combine_slices=...), which the decode handler reads at each launch, and restores them on exit.
    JAX's compiled executables are dropped on entry and on exit, so that no CUDA graph XLA captured under one
    setting replays its kernels under another."""
    names = {f"JAX_FLASHMLA_{name.upper()}": value for name, value in variables.items()}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    jax.clear_caches()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        jax.clear_caches()


@pytest.fixture
def launch_switches():
    """switch(decode_kernel=..., combine=...): launch_environment for the rest of the test (switches may follow)."""
    with contextlib.ExitStack() as switches:
        yield lambda **variables: switches.enter_context(launch_environment(**variables))


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale"))
def reference_f32(q, k_cache, block_table, cache_seqlens, *, causal, softmax_scale):
    return mla_decode_reference(q.astype(jnp.float32), k_cache.astype(jnp.float32), block_table, cache_seqlens,
                                head_dim_v=512, softmax_scale=softmax_scale, causal=causal)


@functools.partial(jax.jit, static_argnames=("causal",))
def kernel_call(q, k_cache, block_table, cache_seqlens, attn_sink=None, *, causal):
    h_q, h_kv = q.shape[2], k_cache.shape[2]
    md, splits = jfm.get_mla_metadata(cache_seqlens, q.shape[1] * h_q // h_kv, h_kv)
    return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, md, splits, causal=causal,
                                      attn_sink=attn_sink, poison_outputs=True)


def assert_same_bits(got, want, err_msg):
    """got and want are the same array bit for bit (NaNs included): compared as unsigned integers of their width."""
    want = np.asarray(want)
    bits = np.uint16 if want.dtype.itemsize == 2 else np.uint32
    np.testing.assert_array_equal(np.asarray(got).view(bits), want.view(bits), err_msg=err_msg)


def check_against_reference(problem, causal, dtype, kernel_q=None):
    """kernel_q: the kernel's q where it differs from the reference's only in rows that must not matter."""
    p = problem
    out, lse = kernel_call(p.q if kernel_q is None else kernel_q, p.k_cache, p.block_table, p.cache_seqlens,
                           causal=causal)
    # The float32 reference materialises (b, h_q, s_q, T) scores: evaluate it 16 sequences at a time.
    chunks = [reference_f32(p.q[i:i + 16], p.k_cache, p.block_table[i:i + 16], p.cache_seqlens[i:i + 16],
                            causal=causal, softmax_scale=p.q.shape[-1] ** -0.5) for i in range(0, p.q.shape[0], 16)]
    ref_out = np.concatenate([np.asarray(o) for o, _ in chunks])
    ref_lse = np.concatenate([np.asarray(l) for _, l in chunks])
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert_out_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse)


GRID = [
    (b, s_q, s_k, h_q, h_kv, varlen, causal, dtype)
    for b, s_q, s_k, h_q, h_kv, varlen, causal, dtype in itertools.product(
        [1, 2, 6, 64], [1, 2, 4], [20, 140, 4096], [1, 16, 64, 128], [1, 2], [False, True], [False, True],
        [jnp.bfloat16, jnp.float16])
    if h_q % h_kv == 0
]


@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,varlen,causal,dtype", GRID)
def test_flashmla_grid(b, s_q, s_k, h_q, h_kv, varlen, causal, dtype, rng_seed):
    rng = np.random.default_rng([rng_seed, b, s_q, s_k, h_q, h_kv, varlen, causal])
    seqlens = lengths(rng, b, s_k, varlen, zero_one=True)
    problem = make_problem(rng, batch=b, s_q=s_q, h_q=h_q, h_kv=h_kv, seqlens=seqlens, dtype=dtype)
    check_against_reference(problem, causal, dtype)


@pytest.mark.parametrize("h_q,h_kv,s_q", [(16, 1, 1), (16, 1, 5), (64, 2, 3), (128, 1, 2), (48, 1, 1),
                                        (96, 1, 3), (24, 2, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_neighbouring_query_rows_never_leak(h_q, h_kv, s_q, causal, rng_seed):
    """A CTA's 64-row block of Q may hold fewer real rows than 64 (s_q*h_q/h_kv < 64, or the last block). The
    Hopper kernel's TMA boxes (head groups that divide 64 or are multiples of it) then also bring rows of the next
    sequence; groups like 48, 96 or 12 load Q with cp.async and zero-fill. NaN in the Q of every other sequence
    (a padded batch slot of length 0) must reach neither its neighbours nor its own output."""
    rng = np.random.default_rng([rng_seed, h_q, h_kv, s_q, causal])
    check_nan_neighbours(rng, s_q=s_q, h_q=h_q, h_kv=h_kv, causal=causal, dtype=jnp.bfloat16)


def check_nan_neighbours(rng, *, s_q, h_q, h_kv, causal, dtype):
    """Six sequences, every other one empty with NaN in its Q: the kernel must match the reference given clean Q."""
    seqlens = lengths(rng, 6, 300, True, zero_one=False)
    seqlens[1::2] = 0
    p = make_problem(rng, batch=6, s_q=s_q, h_q=h_q, h_kv=h_kv, seqlens=seqlens, dtype=dtype)
    check_against_reference(p, causal, dtype, kernel_q=p.q.at[1::2].set(jnp.nan))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_single_softmax_kernel(dtype, launch_switches, rng_seed):
    """The older Hopper kernel, kept to compare against (JAX_FLASHMLA_DECODE_KERNEL=hopper, read at each launch),
    shares the Q load and output stores with the default one: it must stay right too. Splits and single-split
    sequences (float32 partials and direct outputs), causal and not."""
    launch_switches(decode_kernel="hopper")
    rng = np.random.default_rng(rng_seed)
    for batch, s_k, h_q, s_q in ((8, 2048, 16, 1), (64, 140, 128, 2)):  # mostly split; mostly not
        seqlens = lengths(rng, batch, s_k, True, zero_one=True)
        problem = make_problem(rng, batch=batch, s_q=s_q, h_q=h_q, h_kv=1, seqlens=seqlens, dtype=dtype)
        for causal in (False, True):
            check_against_reference(problem, causal, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("h_q,h_kv,s_q", [(16, 1, 1), (16, 1, 2), (8, 1, 3), (32, 2, 1), (4, 1, 1), (10, 1, 3)])
@pytest.mark.parametrize("kernel", ["narrow", "seesaw"])
def test_narrow_head_groups(kernel, h_q, h_kv, s_q, dtype, launch_switches, rng_seed):
    """Head groups of at most 32 query rows: the tokens-as-M kernel (the default there), 16- and 32-wide
    instantiations, and the seesaw, which JAX_FLASHMLA_DECODE_KERNEL=seesaw selects for them. Head groups that
    leave columns empty, splits and single-split sequences, causal and not, partial pages, NaN in a neighbouring
    sequence's Q, and hostile lengths and page ids."""
    launch_switches(decode_kernel=kernel)
    rng = np.random.default_rng([rng_seed, h_q, h_kv, s_q])
    for batch, s_k in ((8, 2048), (64, 140)):  # mostly split; mostly not
        seqlens = lengths(rng, batch, s_k, True, zero_one=True)
        problem = make_problem(rng, batch=batch, s_q=s_q, h_q=h_q, h_kv=h_kv, seqlens=seqlens, dtype=dtype)
        for causal in (False, True):
            check_against_reference(problem, causal, dtype)
    check_nan_neighbours(rng, s_q=s_q, h_q=h_q, h_kv=h_kv, causal=True, dtype=dtype)
    check_against_reference(hostile_problem(rng, s_q=s_q, h_q=h_q, h_kv=h_kv, dtype=dtype), False, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kernel,h_q,s_q", [("narrow", 16, 1), ("narrow", 16, 2), ("seesaw", 128, 2),
                                           ("hopper", 16, 1)])
def test_dependent_combine_launch(kernel, h_q, s_q, dtype, launch_switches, rng_seed):
    """JAX_FLASHMLA_COMBINE=dependent (the default) launches the combine kernel as a programmatic dependent of the
    decode: it may start before the decode ends, and must wait for the partials (poisoned with NaN before each decode). Three
    decodes back to back in one jitted call (each next one's poisoning follows a combine), called four times, give
    the plain launch's out and lse bit for bit, and match the reference. The narrow and seesaw kernels allow the
    dependent launch at their start, the single-softmax kernel only by exiting. A build with
    -DJFM_PROBE_COMBINE_NO_WAIT (the combine does not wait) is expected to fail this test."""
    launch_switches(decode_kernel=kernel)
    rng = np.random.default_rng([rng_seed, h_q, s_q])
    seqlens = lengths(rng, 16, 2048, True, zero_one=True)
    p = make_problem(rng, batch=16, s_q=s_q, h_q=h_q, h_kv=1, seqlens=seqlens, dtype=dtype)
    md, splits = jfm.get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    assert (np.diff(np.asarray(splits)) > 1).sum() >= 4  # the schedule splits several sequences

    @jax.jit
    def three_decodes(q, k_cache, block_table, cache_seqlens, md, splits):
        results = []
        for _ in range(3):
            out, lse = jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, md, splits,
                                                  causal=True, poison_outputs=True)
            results += [out, lse]
            q = q + (0 * out[..., :1]).astype(q.dtype)  # the next decode depends on this one's output
        return results

    args = (p.q, p.k_cache, p.block_table, p.cache_seqlens, md, splits)
    launch_switches(combine="separate")
    plain = [np.asarray(x) for x in three_decodes(*args)]
    launch_switches(combine="dependent")  # which also drops what was compiled under the other setting
    for call in range(4):  # a race shows only sometimes: several calls
        for i, (want, got) in enumerate(zip(plain, three_decodes(*args))):
            assert_same_bits(got, want, f"call {call}, result {i}")
    check_against_reference(p, True, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("batch,h_q,s_q", [(6, 16, 1), (40, 128, 2)], ids=["column_per_sequence", "column_per_part"])
def test_combine_slices_give_the_same_bits(batch, h_q, s_q, dtype, launch_switches, rng_seed):
    """The combine merges a query row with two or four warps (JAX_FLASHMLA_COMBINE_SLICES forces the count; by
    default the schedule's shape picks it). Each output element is the same chain of fmaf in split order either
    way, so out and lse agree bit for bit, and with the reference. Its grid has a column per sequence where the
    batch has at most as many sequences as the schedule has parts (b 6: 132 parts), else a column per part (b 40
    at h_q 128, s_q 2: 33 parts); both are run."""
    rng = np.random.default_rng([rng_seed, batch, h_q])
    seqlens = lengths(rng, batch, 2048, True, zero_one=True)
    p = make_problem(rng, batch=batch, s_q=s_q, h_q=h_q, h_kv=1, seqlens=seqlens, dtype=dtype)
    md, splits = jfm.get_mla_metadata(p.cache_seqlens, s_q * h_q, 1)
    assert (np.diff(np.asarray(splits)) > 1).sum() >= 2  # the schedule splits several sequences
    assert (batch <= md.shape[0]) == (batch == 6)  # the two grid forms
    results = {}
    for slices in ("2", "4"):
        launch_switches(combine_slices=slices)
        results[slices] = [np.asarray(x) for x in kernel_call(p.q, p.k_cache, p.block_table, p.cache_seqlens,
                                                              causal=True)]
    for want, got in zip(results["2"], results["4"]):
        assert_same_bits(got, want, "4 warps a row")
    check_against_reference(p, True, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_head_dim_512_and_all_empty(dtype, rng_seed):
    rng = np.random.default_rng(rng_seed)
    seqlens = lengths(rng, 5, 300, True, zero_one=True)
    check_against_reference(make_problem(rng, batch=5, s_q=2, h_q=16, h_kv=1, seqlens=seqlens, dtype=dtype,
                                         head_dim=512), True, dtype)
    empty = make_problem(rng, batch=3, s_q=1, h_q=16, h_kv=1, seqlens=np.array([0, 0, 1], np.int32), dtype=dtype)
    out, lse = kernel_call(empty.q, empty.k_cache, empty.block_table, jnp.zeros(3, jnp.int32), causal=False)
    assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.isposinf(np.asarray(lse)))


@pytest.mark.parametrize("h_q,s_q", [(16, 1), (128, 2)], ids=["narrow", "seesaw"])
def test_attention_sink_on_the_kernels(h_q, s_q, rng_seed):
    """attn_sink is an XLA epilogue on the kernels' out and lse: against the float64 oracle, which has the sink
    as one more key with a zero value. Sinks of -inf, +inf and finite ones; an empty sequence."""
    rng = np.random.default_rng([rng_seed, h_q])
    p = make_problem(rng, batch=3, s_q=s_q, h_q=h_q, h_kv=1, seqlens=np.array([150, 0, 64], np.int32),
                     dtype=jnp.bfloat16)
    sink = rng.normal(size=h_q).astype(np.float32)
    sink[:2] = -np.inf, np.inf
    out, lse = kernel_call(p.q, p.k_cache, p.block_table, p.cache_seqlens, jnp.asarray(sink), causal=True)
    want_out, want_lse = problem_oracle(p, True, attn_sink=sink)
    assert_out_close(out, want_out, jnp.bfloat16)
    assert_lse_close(lse, want_lse)
    assert np.all(np.asarray(out, np.float32)[:, :, 1] == 0) and np.all(np.asarray(out, np.float32)[1] == 0)


def test_hostile_runtime_values_stay_in_bounds(rng_seed):
    """Lengths past the table, negative lengths, out-of-range and negative page ids: the reference's
    semantics (clip lengths, ignore bad pages), no fault."""
    problem = hostile_problem(np.random.default_rng(rng_seed), s_q=2, h_q=16, h_kv=1, dtype=jnp.bfloat16)
    for causal in (False, True):
        check_against_reference(problem, causal, jnp.bfloat16)


@pytest.mark.parametrize("kernel,head_dim", [("seesaw", 576), ("narrow", 576), ("narrow_dependent_combine", 576),
                                             ("portable", 512)])
def test_hostile_metadata_stays_in_bounds(kernel, head_dim, launch_switches, rng_seed):
    """The schedule is a runtime value too. One computed for other lengths, arbitrary integers, or the extremes of
    int32 make the results undefined, but no kernel (split-KV, combine, its dependent launch) may
    fault or read or write out of bounds: compute-sanitizer's memcheck runs this (scripts/sanitize_cases.py, with
    the default dependent launch; gpu_check.sh's separate_* steps run the plain one). Afterwards the right
    schedule still gives the right answer."""
    launch_switches(decode_kernel="seesaw" if kernel in ("seesaw", "portable") else "narrow",
                    combine="dependent" if kernel == "narrow_dependent_combine" else "separate")
    for problem, causal in hostile_metadata_problems(np.random.default_rng(rng_seed), head_dim):
        check_against_reference(problem, causal, jnp.bfloat16)


def hostile_metadata_problems(rng, head_dim):
    """Runs the problem's decode under each hostile schedule (its results discarded), and after each yields the
    problem, to be checked with the right schedule."""
    batch = 6
    seqlens = lengths(rng, batch, 700, True, zero_one=True)
    p = make_problem(rng, batch=batch, s_q=1, h_q=16, h_kv=1, seqlens=seqlens, dtype=jnp.bfloat16, head_dim=head_dim)
    md, splits = jfm.get_mla_metadata(p.cache_seqlens, 16, 1)
    parts = md.shape[0]
    schedules = [jfm.get_mla_metadata(jnp.asarray(seqlens * 3 + 64), 16, 1),  # for longer sequences
                 jfm.get_mla_metadata(jnp.asarray(seqlens // 3), 16, 1),  # for shorter ones
                 # Each field near its own range: batches, blocks, the first split; and wrong prefix sums.
                 (np.stack([rng.integers(lo, hi, parts) for lo, hi in
                            ((-2, batch + 2), (-3, 40), (-2, batch + 2), (-3, 40), (-2, 6), (-1, 2), (-1, 2), (-1, 2))],
                           axis=1).astype(np.int32), rng.integers(-5, batch + parts + 5, batch + 1)),
                 (rng.choice([INT32_MIN, -1, 0, 1, INT32_MAX], md.shape).astype(np.int32),
                  rng.choice([INT32_MIN, -1, 0, 1, batch + parts, INT32_MAX], batch + 1))]
    for hostile_md, hostile_splits in schedules:
        out, lse = jfm.flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, 512,
                                              jnp.asarray(hostile_md, jnp.int32), jnp.asarray(hostile_splits, jnp.int32),
                                              causal=True, poison_outputs=True)
        jax.block_until_ready((out, lse))
        yield p, True


@pytest.mark.parametrize("kernel,h_q,s_q,head_dim", [("default", 16, 1, 576), ("default", 16, 2, 576),
                                                     ("default", 128, 2, 576), ("hopper", 64, 1, 576),
                                                     ("default", 16, 2, 512)])
def test_lengths_near_int32_max(kernel, h_q, s_q, head_dim, launch_switches, rng_seed):
    """Lengths of INT32_MAX and near it, in a batch of 70 (over 63, so the scheduler's clip is below 2**24 pages):
    the scheduler clips them without overflow, and the kernels give the reference's answer for lengths clipped to
    the block table. Before the clip, (L + 63) / 64 wrapped and no part was given the other sequences."""
    if kernel != "default":
        launch_switches(decode_kernel=kernel)
    problem = int32_extreme_lengths_problem(np.random.default_rng([rng_seed, h_q, s_q, head_dim]), s_q=s_q, h_q=h_q,
                                            head_dim=head_dim)
    for causal in (False, True):
        check_against_reference(problem, causal, jnp.bfloat16)


def int32_extreme_lengths_problem(rng, *, s_q, h_q, head_dim, batch=70, capacity_pages=6):
    """Sequences that own every page of their block-table row get lengths past it, up to INT32_MAX (so the
    clipped length reads real keys); one short sequence gets INT32_MIN."""
    seqlens = rng.integers(0, PAGE * capacity_pages, batch).astype(np.int32)
    long = rng.random(batch) < 0.3
    long[0] = True
    seqlens[long] = PAGE * capacity_pages
    p = make_problem(rng, batch=batch, s_q=s_q, h_q=h_q, h_kv=1, seqlens=seqlens, dtype=jnp.bfloat16,
                     head_dim=head_dim, spare_pages=0)
    hostile = seqlens.copy()
    hostile[long] = rng.choice([INT32_MAX, INT32_MAX - 63, 2**30 + 1, PAGE * capacity_pages + 1], int(long.sum()))
    hostile[0] = INT32_MAX
    hostile[np.flatnonzero(~long)[0]] = INT32_MIN
    return type(p)(p.q, p.k_cache, p.block_table, jnp.asarray(hostile))


def hostile_problem(rng, *, s_q, h_q, h_kv, dtype):
    """Four sequences whose lengths and block table hold the hostile values."""
    # Sequence 0 owns all 4 pages of its table row, so the length clipped to the capacity reads real keys.
    seqlens = np.array([256, 130, 64, 70], np.int32)
    p = make_problem(rng, batch=4, s_q=s_q, h_q=h_q, h_kv=h_kv, seqlens=seqlens, dtype=dtype, spare_pages=0)
    table = np.asarray(p.block_table).copy()
    table[1, 1] = -7  # a negative id inside the length
    table[2, 0] = UNUSED_PAGE_ID  # a huge id inside the length
    hostile = jnp.asarray(np.array([10_000, 130, 64, -5], np.int32))  # past capacity; negative
    return type(p)(p.q, p.k_cache, jnp.asarray(table), hostile)


@pytest.mark.parametrize("head_dim", [576, 512], ids=["hopper_kernel", "portable_kernel"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stacked_pool_reads_its_layer(head_dim, dtype, rng_seed):
    """k_cache (L, P, 64, h_kv, d) with layer=l, static or traced: the kernels read layer l in place. Every other
    layer is NaN, so a read of the wrong layer (or past the stack's end, for the last layer) cannot pass."""
    rng = np.random.default_rng([rng_seed, head_dim])
    seqlens = lengths(rng, 6, 700, True, zero_one=True)
    p = make_problem(rng, batch=6, s_q=2, h_q=16, h_kv=1, seqlens=seqlens, dtype=dtype, head_dim=head_dim)
    nan_pool = jnp.full_like(p.k_cache, jnp.nan)
    ref_out, ref_lse = reference_f32(p.q, p.k_cache, p.block_table, p.cache_seqlens, causal=True,
                                     softmax_scale=head_dim ** -0.5)
    decode = lambda q, pools, layer: jfm.flash_mla_with_kvcache(q, pools, p.block_table, p.cache_seqlens, 512,
                                                                causal=True, layer=layer, poison_outputs=True)
    static, traced = jax.jit(decode, static_argnums=2), jax.jit(decode)
    # (layers, layer to fill, index passed): a traced index out of range clamps to the first or last layer; a
    # negative one to the first (-1 would wrap around to the last as a jnp index).
    for num_layers, layer, index in ((3, 1, 1), (2, 0, 0), (2, 1, 1), (3, 2, 9), (3, 0, -4), (3, 0, -1)):
        pools = jnp.stack([p.k_cache if i == layer else nan_pool for i in range(num_layers)])
        calls = [("traced", traced, jnp.int32(index))] + [("static", static, index)] * (index == layer)
        for how, call, arg in calls:
            out, lse = call(p.q, pools, arg)
            what = f"{how} layer {index} of {num_layers}"
            assert_out_close(out, ref_out, dtype, what=f"{what} out")
            assert_lse_close(lse, ref_lse, what=f"{what} lse")


def test_metadata_kernel_matches_spec(rng_seed):
    rng = np.random.default_rng(rng_seed)
    extremes = np.array([INT32_MAX, INT32_MAX - 63, 2**30 + 1, INT32_MIN], np.int32)
    for batch in [1, 2, 7, 64, 128, 5000]:
        for num_parts in [1, 3, 66, 132]:
            seqlens = rng.integers(-10, 20000, batch).astype(np.int32)
            seqlens[rng.random(batch) < 0.2] = 0
            if num_parts != 3:  # lengths near the int32 limits, which the scheduler clips (scheduler.py)
                extreme = rng.random(batch) < 0.1
                seqlens[extreme] = rng.choice(extremes, int(extreme.sum()))
            cpu_seqlens = jax.device_put(seqlens, jax.devices("cpu")[0])
            for charge in (1, 2, 5):  # blocks charged per split: the least, the narrow kernel's, the seesaw's
                got = jax.jit(lambda s, n=num_parts, c=charge: jfm.primitives.mla_metadata_p.bind(
                    s, num_parts=n, split_overhead=c))(jnp.asarray(seqlens))
                want = jax.jit(lambda s, n=num_parts, c=charge: scheduler.schedule(s, n, c))(cpu_seqlens)
                what = f"b={batch} P={num_parts} charge={charge}"
                np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]), err_msg=what)
                np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]), err_msg=what)


def test_vmap_over_layer_pools(rng_seed):
    """vmap over stacked per-layer pools folds into one launch; each layer matches the reference."""
    rng = np.random.default_rng(rng_seed)
    seqlens = lengths(rng, 6, 700, True, zero_one=True)
    p = make_problem(rng, batch=6, s_q=2, h_q=16, h_kv=1, seqlens=seqlens, dtype=jnp.bfloat16)
    pools = jnp.stack([(p.k_cache.astype(jnp.float32) * (1 + 0.5 * i)).astype(jnp.bfloat16) for i in range(3)])
    qs = jnp.stack([p.q, -p.q, p.q * 2])
    f = lambda q, k: jfm.flash_mla_with_kvcache(q, k, p.block_table, p.cache_seqlens, 512, causal=True)
    out, lse = jax.jit(jax.vmap(f))(qs, pools)
    for i in range(3):
        ref_out, ref_lse = reference_f32(qs[i], pools[i], p.block_table, p.cache_seqlens, causal=True,
                                         softmax_scale=576 ** -0.5)
        assert_out_close(out[i], ref_out, jnp.bfloat16, what=f"layer {i} out")
        assert_lse_close(lse[i], ref_lse, what=f"layer {i} lse")
