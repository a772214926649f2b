"""SPMD partitioning (jax_flashmla/sharding.py): on 8 CPU devices every mesh layout equals the single-device
call and the compiled program moves no data between devices; unsupported layouts are refused by name.

XLA_FLAGS only takes effect before JAX starts, so in an ordinary run (one CPU device) test_on_8_cpu_devices
re-runs this file in a subprocess with --xla_force_host_platform_device_count=8 and carries its verdict; the
tests marked `eight_devices` skip here and run there. The layout rules are also checked here directly, on
abstract meshes.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import jax_flashmla as jfm
from jax_flashmla import sharding

from cases import UNUSED_PAGE_ID, make_problem

DEVICES = 8
HAVE_DEVICES = len(jax.devices("cpu")) >= DEVICES
eight_devices = pytest.mark.skipif(not HAVE_DEVICES, reason="runs in test_on_8_cpu_devices' subprocess")
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]  # (data, model)
COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter|"
                        r"collective-broadcast|send|recv)(-start)?\(")


def test_on_8_cpu_devices(rng_seed):
    if HAVE_DEVICES:
        pytest.skip("this process has 8 CPU devices: the tests run here directly")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip(),
               JAX_PLATFORMS="cpu", JFM_SEED=str(rng_seed))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(__file__)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                             "-k", "not test_on_8_cpu_devices"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, report


# ----------------------------------------------------------------------------------------------------
# Helpers


def make_mesh(shape, axis_types=AxisType.Auto):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_types,) * 2, devices=jax.devices("cpu")[:DEVICES])


def put(mesh, *pairs):
    return tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in pairs)


def run_without_collectives(f, *args, **jit_kwargs):
    """Compile f for args' shardings, assert the program has no cross-device op, run it."""
    compiled = jax.jit(f, **jit_kwargs).lower(*args).compile()
    found = sorted({m.group(0) for m in COLLECTIVE.finditer(compiled.as_text())})
    assert not found, f"collectives in the partitioned program: {found}"
    return compiled(*args)


def assert_same(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def split_problem(rng, shards, *, batch=8, s_q=2, h_q=8, h_kv=1):
    """A float32 problem whose batch shard i keeps its pages in page shard i (scattered inside it)."""
    rows = batch // shards
    parts = [make_problem(rng, batch=rows, s_q=s_q, h_q=h_q, h_kv=h_kv, dtype=jnp.float32,
                          seqlens=rng.integers(0, 300, rows).astype(np.int32)) for _ in range(shards)]
    pages = max(p.k_cache.shape[0] for p in parts)
    width = max(p.block_table.shape[1] for p in parts)
    pools, tables = [], []
    for i, p in enumerate(parts):
        pools.append(jnp.pad(p.k_cache, ((0, pages - p.k_cache.shape[0]),) + ((0, 0),) * 3, constant_values=np.nan))
        table = np.asarray(p.block_table)
        table = np.where(table == UNUSED_PAGE_ID, table, table + i * pages)  # global ids; unused stay huge
        tables.append(np.pad(table, ((0, 0), (0, width - table.shape[1])), constant_values=-1))
    return (jnp.concatenate([p.q for p in parts]), jnp.concatenate(pools), jnp.asarray(np.concatenate(tables)),
            jnp.concatenate([p.cache_seqlens for p in parts]))


def decode(q, k_cache, block_table, cache_seqlens, given_schedule=False):
    md = splits = None
    if given_schedule:
        md, splits = jfm.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2], k_cache.shape[2])
    return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, md, splits, causal=True)


def split_cache(rng, shards, *, batch=8, max_seq_len=192, num_layers=2, head_dim=576):
    """An empty float32 cache whose sequences' pages are scattered inside their own page shard."""
    per_seq = -(-max_seq_len // 64)
    per_shard = batch // shards * per_seq
    table = np.concatenate([i * per_shard + rng.permutation(per_shard) for i in range(shards)])
    return jfm.PagedKVCache.create(batch_size=batch, max_seq_len=max_seq_len, num_layers=num_layers,
                                   head_dim=head_dim, dtype=jnp.float32, num_pages=batch * per_seq,
                                   block_table=jnp.asarray(table.reshape(batch, per_seq), jnp.int32))


def put_cache(mesh, cache, pages=P(None, "data"), rows=P("data")):
    new_pages, table, seqlens = put(mesh, (cache.pages, pages), (cache.block_table, rows), (cache.seqlens, rows))
    return jfm.PagedKVCache(pages=new_pages, block_table=table, seqlens=seqlens)


# ----------------------------------------------------------------------------------------------------
# Decode


@eight_devices
@pytest.mark.parametrize("given_schedule", [False, True], ids=["schedule_computed", "schedule_given"])
@pytest.mark.parametrize("shape", MESHES, ids=[f"data{d}_model{m}" for d, m in MESHES])
def test_decode_equals_single_device(shape, given_schedule, rng_seed):
    """A schedule computed from the global lengths is replaced by per-shard ones (and dropped by XLA)."""
    q, k_cache, table, seqlens = split_problem(np.random.default_rng(rng_seed), shape[0])
    want = decode(q, k_cache, table, seqlens, given_schedule)
    mesh = make_mesh(shape)
    args = put(mesh, (q, P("data", None, "model")), (k_cache, P("data")), (table, P("data")), (seqlens, P("data")))
    out, lse = run_without_collectives(lambda *a: decode(*a, given_schedule), *args)
    assert_same((out, lse), want)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model", None)), 4)
    assert lse.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model", None)), 3)


@eight_devices
@pytest.mark.parametrize("layout", ["replicated_pool", "only_pool_split"])
def test_decode_with_replicated_arguments(layout, rng_seed):
    """A replicated pool is read in place (no rebasing); replicated rows are sliced like a split pool."""
    q, k_cache, table, seqlens = split_problem(np.random.default_rng(rng_seed), 4)
    want = decode(q, k_cache, table, seqlens)
    mesh = make_mesh((4, 2))
    if layout == "replicated_pool":
        specs = (P("data", None, "model"), P(), P("data"), P("data"))
    else:
        specs = (P(), P("data"), P(), P())
    args = put(mesh, *zip((q, k_cache, table, seqlens), specs))
    results = NamedSharding(mesh, P("data", None, "model")), NamedSharding(mesh, P("data", "model"))
    assert_same(run_without_collectives(decode, *args, out_shardings=results), want)


@eight_devices
def test_eager_call_and_scan_over_layers(rng_seed):
    """An eager call on sharded arrays partitions too; so does a decode inside lax.scan over stacked pools,
    scanning over the pools or over layer indices into one stacked pool."""
    q, k_cache, table, seqlens = split_problem(np.random.default_rng(rng_seed), 4)
    mesh = make_mesh((4, 2))
    args = put(mesh, (q, P("data", None, "model")), (k_cache, P("data")), (table, P("data")), (seqlens, P("data")))
    out, lse = decode(*args)
    assert_same((out, lse), decode(q, k_cache, table, seqlens))
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model", None)), 4)

    def layers(q, pools, table, seqlens):
        return jax.lax.scan(lambda carry, pool: (carry, decode(q, pool, table, seqlens)), 0, pools)[1]

    pools = jnp.stack([k_cache, k_cache / 2])
    got = run_without_collectives(layers, args[0], *put(mesh, (pools, P(None, "data"))), *args[2:])
    assert_same(got, layers(q, pools, table, seqlens))

    def layers_in_place(q, pools, table, seqlens):  # the stack stays whole; the scan carries only the index
        step = lambda _, i: (None, jfm.flash_mla_with_kvcache(q, pools, table, seqlens, 512, causal=True, layer=i))
        return jax.lax.scan(step, None, jnp.arange(pools.shape[0], dtype=jnp.int32))[1]

    got = run_without_collectives(layers_in_place, args[0], *put(mesh, (pools, P(None, "data"))), *args[2:])
    assert_same(got, layers(q, pools, table, seqlens))


@eight_devices
def test_schedule_is_per_shard():
    """Inside a shard the schedule comes from the shard's lengths and is sized for its heads: with 128 heads
    split over 2 devices, 64 query rows fill one 64-row block, so 132 parts (66 for the global 128 rows)."""
    mesh = make_mesh((4, 2))
    shapes = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, spec)) for s, d, spec in [
        ((8, 1, 128, 576), jnp.float32, P("data", None, "model")), ((32, 64, 1, 576), jnp.float32, P("data")),
        ((8, 4), jnp.int32, P("data")), ((8,), jnp.int32, P("data")), ((66, 8), jnp.int32, P()),
        ((9,), jnp.int32, P()), ((), jnp.int32, P())]]
    _, per_shard, _, arg_shardings = sharding._decode_partition(512, 0.04, False, False, mesh, shapes, None)
    local = [jax.ShapeDtypeStruct(s.shard_shape(a.shape), a.dtype) for s, a in zip(arg_shardings, shapes)]
    jaxpr = jax.make_jaxpr(per_shard, axis_env=list(mesh.shape.items()))(*local).jaxpr
    schedule = [e for e in jaxpr.eqns if e.primitive.name == "jax_flashmla_mla_metadata"]
    assert len(schedule) == 1 and schedule[0].params["num_parts"] == 132
    assert schedule[0].params["split_overhead"] == 5  # the shard's 64 heads x 1 query token: the seesaw's charge
    assert schedule[0].invars[0] is jaxpr.invars[3]  # the shard's own cache_seqlens (2,)
    assert schedule[0].invars[0].aval.shape == (2,)


# ----------------------------------------------------------------------------------------------------
# Cache writes, and a decode step as the Flax module runs it


@eight_devices
@pytest.mark.parametrize("layout", ["split", "replicated_rows"])
def test_cache_write_equals_single_device(layout, rng_seed):
    """Split rows write into their page shard; replicated rows are scanned by every page shard."""
    rng = np.random.default_rng(rng_seed)
    cache = split_cache(rng, 4)
    kv = rng.normal(size=(8, 70, 1, 576)).astype(np.float32)
    num_new = rng.integers(0, 71, 8).astype(np.int32)
    step = lambda c, kv, n: c.write(kv, layer=1, num_new=n).advance(n)
    want = step(step(cache, kv, num_new), kv[:, :3], np.full(8, 3, np.int32))
    mesh = make_mesh((4, 2))
    pages, rows = {"split": (P(None, "data"), P("data")), "replicated_rows": (P(None, "data"), P())}[layout]
    got = put_cache(mesh, cache, pages, rows)
    for kv_new, n in ((kv, num_new), (kv[:, :3], np.full(8, 3, np.int32))):
        got = run_without_collectives(step, got, *put(mesh, (kv_new, rows), (n, rows)))
    assert_same(got, want)
    assert got.pages.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 5)


@eight_devices
@pytest.mark.parametrize("pool", ["stacked", "layer_pages"])
@pytest.mark.parametrize("axis_types", [AxisType.Auto, AxisType.Explicit])
def test_decode_step_writes_then_attends(axis_types, pool, rng_seed):
    """mla_module's decode step: write the new latents, attend over the cache, per shard, in place. The
    decode reads the stacked pool with layer= (as mla_module does) or FlashMLA's one-layer pool, with an
    attention sink (an XLA epilogue, partitioned like out), split like q's heads or replicated.
    Under Explicit axes (jax.make_mesh's default) the result types carry the split too."""
    rng = np.random.default_rng(rng_seed)
    lengths = rng.integers(0, 151, 8).astype(np.int32)
    prompts = rng.normal(size=(8, 150, 1, 576)).astype(np.float32) / 10
    cache = split_cache(rng, 2).write(prompts, layer=0, num_new=lengths)
    cache = cache.write(prompts[:, ::-1] * 2, layer=1, num_new=lengths).advance(lengths)
    q = jnp.asarray(rng.normal(size=(8, 1, 8, 576)).astype(np.float32) / 10)
    kv = jnp.asarray(rng.normal(size=(8, 1, 1, 576)).astype(np.float32) / 10)
    sink = rng.normal(size=8).astype(np.float32)  # split as q's heads, or a replicated constant

    def step(cache, q, kv, sink, sharded=True):
        cache = cache.write(kv, layer=1)
        if pool == "stacked":
            out, lse = jfm.flash_mla_with_kvcache(q, cache.pages, cache.block_table, cache.seqlens + 1, 512, layer=1,
                                                  attn_sink=sink)
        else:
            out, lse = jfm.flash_mla_with_kvcache(q, cache.layer_pages(1), cache.block_table, cache.seqlens + 1, 512,
                                                  attn_sink=sink)
        if sharded and axis_types == AxisType.Explicit:
            assert jax.typeof(out).sharding.spec == P("data", None, "model", None)
            assert jax.typeof(cache.pages).sharding.spec == P(None, "data", None, None, None)
        return out, lse, cache.advance(1)

    want = step(cache, q, kv, sink, sharded=False)
    mesh = make_mesh((2, 4), axis_types)
    for sink_spec in (P("model"), P()):
        with jax.set_mesh(mesh):
            got = run_without_collectives(step, put_cache(mesh, cache), *put(mesh, (q, P("data", None, "model")),
                                                                              (kv, P("data")), (sink, sink_spec)),
                                          donate_argnums=0)
        assert_same(got, want)


@eight_devices
def test_attention_sink_split_on_another_axis(rng_seed):
    """Under Explicit axes a sink split over the batch's axis, not the heads', is moved to the heads' split (a
    collective, the only one) rather than failing on mismatched shardings."""
    q, k_cache, table, seqlens = split_problem(np.random.default_rng(rng_seed), 2)
    sink = np.random.default_rng(rng_seed + 1).normal(size=q.shape[2]).astype(np.float32)
    decode_with_sink = lambda q, k, t, l, sink: jfm.flash_mla_with_kvcache(q, k, t, l, 512, causal=True,
                                                                           attn_sink=sink)
    want = decode_with_sink(q, k_cache, table, seqlens, sink)
    mesh = make_mesh((2, 4), AxisType.Explicit)
    with jax.set_mesh(mesh):
        args = put(mesh, (q, P("data", None, "model")), (k_cache, P("data")), (table, P("data")),
                   (seqlens, P("data")), (sink, P("data")))
        got = jax.jit(decode_with_sink)(*args)
    assert_same(got, want)
    assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model", None)), 4)


@eight_devices
@pytest.mark.parametrize("axis_types", [AxisType.Auto, AxisType.Explicit])
def test_sparse_attention_partitions_through_xla(axis_types, rng_seed):
    """Sparse decode and prefill are plain jnp: over Auto axes XLA partitions them, over Explicit axes they run
    with the axes switched to Auto. Either way they equal the single-device call, come back split as q's batch
    (tokens) and heads, and move no data while the cache is replicated."""
    rng = np.random.default_rng(rng_seed)
    q = jnp.asarray(rng.normal(size=(8, 2, 8, 576)) / 10, jnp.float32)
    k_cache = jnp.asarray(rng.normal(size=(6, 64, 1, 576)) / 10, jnp.float32)
    indices = jnp.asarray(rng.integers(-1, 6 * 64 + 9, size=(8, 2, 48)), jnp.int32)
    topk_length = jnp.asarray(rng.integers(0, 60, size=8), jnp.int32)
    sink = jnp.asarray(rng.normal(size=8), jnp.float32)
    sparse_decode = lambda q, k, i, t, s: jfm.flash_mla_with_kvcache(q, k, None, None, 512, indices=i, topk_length=t,
                                                                     attn_sink=s)
    prefill = lambda q, kv, i, t, s: jfm.flash_mla_sparse_fwd(q, kv, i, 0.05, attn_sink=s, topk_length=t)
    prefill_args = (q[:, 0], k_cache.reshape(-1, 1, 576), indices[:, :1], topk_length)
    want = sparse_decode(q, k_cache, indices, topk_length, sink), prefill(*prefill_args, sink)
    mesh = make_mesh((4, 2), axis_types)
    with jax.set_mesh(mesh):
        got_decode = run_without_collectives(sparse_decode, *put(
            mesh, (q, P("data", None, "model")), (k_cache, P()), (indices, P("data")), (topk_length, P("data")),
            (sink, P("model"))))
        got_prefill = run_without_collectives(prefill, *put(
            mesh, (prefill_args[0], P("data", "model")), (prefill_args[1], P()), (prefill_args[2], P("data")),
            (topk_length, P("data")), (sink, P("model"))))
        # Only the indices placed: q and the cache come unplaced (under Explicit axes the mesh is the indices').
        got_unplaced_q = jax.jit(sparse_decode)(q, k_cache, *put(mesh, (indices, P("data"))), topk_length, sink)
    assert_same((got_decode, got_prefill, got_unplaced_q), (*want, want[0]))
    assert got_decode[0].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model", None)), 4)
    assert got_decode[1].sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model", None)), 3)
    for result in got_prefill:
        assert result.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), result.ndim)


# ----------------------------------------------------------------------------------------------------
# Unsupported layouts


@eight_devices
def test_unsupported_layout_fails_compilation_with_the_message(rng_seed):
    q, k_cache, table, seqlens = split_problem(np.random.default_rng(rng_seed), 4)
    mesh = make_mesh((4, 2))
    args = put(mesh, (q, P("data", None, None, "model")), (k_cache, P("data")), (table, P("data")),
               (seqlens, P("data")))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"q is sharded as P\('data', None, None, 'model'\), "
                       r"which splits its head dim axis.*supported layouts"):
        jax.jit(decode).lower(*args).compile()
    cache = put_cache(mesh, split_cache(np.random.default_rng(rng_seed), 4), P(None, "data", None, None, "model"))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"PagedKVCache.write: pages .* head dim"):
        jax.jit(lambda c, kv: c.write(kv)).lower(cache, *put(mesh, (np.ones((8, 1, 1, 576), np.float32),
                                                                    P("data")))).compile()


ABSTRACT = AbstractMesh((4, 2), ("data", "model"))


def shaped(shape, spec, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(ABSTRACT, spec))


def decode_shapes(q=P("data", None, "model"), k_cache=P("data"), table=P("data"), seqlens=P("data"), h_kv=1,
                  batch=8, heads=8, pages=32):
    return [shaped((batch, 2, heads, 576), q), shaped((pages, 64, h_kv, 576), k_cache),
            shaped((batch, 4), table, jnp.int32), shaped((batch,), seqlens, jnp.int32)]


def test_decode_layout_accepts_the_supported_ones():
    assert sharding.decode_layout(ABSTRACT, decode_shapes()) == sharding.DecodeLayout(("data",), ("model",), ("data",))
    stacked = decode_shapes()
    stacked[1] = shaped((3, 32, 64, 1, 576), P(None, "data"))
    assert sharding.decode_layout(ABSTRACT, stacked) == sharding.DecodeLayout(("data",), ("model",), ("data",))
    assert sharding.decode_layout(ABSTRACT, decode_shapes(k_cache=P())).pool == ()
    only_pool = sharding.decode_layout(ABSTRACT, decode_shapes(q=P(), table=P(), seqlens=P()))
    assert only_pool == sharding.DecodeLayout(("data",), (), ("data",))
    both = sharding.decode_layout(ABSTRACT, decode_shapes(q=P(("data", "model")), k_cache=P(("data", "model")),
                                                          table=P(), seqlens=P()))
    assert both.batch == ("data", "model") and both.heads == ()


def test_decode_layout_refuses_a_split_layer_axis():
    shapes = decode_shapes()
    shapes[1] = shaped((4, 32, 64, 1, 576), P("data", None))
    with pytest.raises(ValueError, match=r"k_cache is sharded as P\('data', None, None, None, None\), which "
                                         "splits its layer axis"):
        sharding.decode_layout(ABSTRACT, shapes)


@pytest.mark.parametrize("overrides,words", [
    (dict(q=P("data", None, None, "model")), ["q is sharded as P('data', None, None, 'model')", "head dim"]),
    (dict(q=P("data", "model")), ["q", "s_q"]),
    (dict(k_cache=P("data", None, None, "model")), ["k_cache", "head dim"]),
    (dict(k_cache=P("model")), ["k_cache", "page axis over ('model',)", "batch is split over ('data',)"]),
    (dict(table=P("model")), ["block_table", "batch axis over ('model',)", "q uses ('data',)"]),
    (dict(seqlens=P(("data", "model"))), ["cache_seqlens", "('data', 'model')"]),
    (dict(table=P("data", "model")), ["block_table", "max_pages_per_seq"]),
    (dict(q=P(None, None, "data"), table=P(), seqlens=P()), ["q", "overlap the batch axes"]),
    (dict(h_kv=2, heads=8), ["q", "h_kv = 2", "h_kv == 1"]),
    (dict(batch=6), ["batch size (6)", "4 shards"]),
    (dict(pages=30), ["page count (30)"]),
])
def test_decode_layout_refuses_with_names(overrides, words):
    with pytest.raises(ValueError) as error:
        sharding.decode_layout(ABSTRACT, decode_shapes(**overrides))
    for word in words + ["flash_mla_with_kvcache", "supported layouts"]:
        assert word in str(error.value), (word, str(error.value))


def write_shapes(pages=P(None, "data"), kv=P("data"), rows=P("data")):
    return (shaped((2, 32, 64, 1, 576), pages), shaped((8, 3, 1, 576), kv), shaped((8, 3), rows, jnp.int32),
            shaped((8, 3), rows, jnp.int32))


def test_write_layout():
    assert sharding.write_layout(ABSTRACT, *write_shapes()) == (("data",), ("data",))
    assert sharding.write_layout(ABSTRACT, *write_shapes(kv=P(), rows=P())) == ((), ("data",))  # rows whole
    for overrides, words in [(dict(pages=P("data")), ["pages", "layer"]),
                             (dict(pages=P(None, "model")), ["pages", "page axis over ('model',)"]),
                             (dict(pages=P()), ["pages", "over no mesh axes", "diverge"]),
                             (dict(kv=P("data", None, None, "model")), ["kv", "head dim"]),
                             (dict(kv=P("model")), ["block_table", "batch axis"])]:
        with pytest.raises(ValueError) as error:
            sharding.write_layout(ABSTRACT, *write_shapes(**overrides))
        for word in words + ["PagedKVCache.write", "supported layouts"]:
            assert word in str(error.value), (word, str(error.value))


# ----------------------------------------------------------------------------------------------------
# Placing a cache on a mesh


@eight_devices
def test_shard_cache_on_a_flag_mesh(rng_seed):
    """What the demo does with --mesh data=4,model=2: the default cache layout needs nothing more."""
    mesh = sharding.mesh_from_flag("data=4,model=2")
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    rng = np.random.default_rng(rng_seed)
    cache = jfm.PagedKVCache.create(batch_size=8, max_seq_len=130, head_dim=576, dtype=jnp.float32)
    prompt, q = rng.normal(size=(8, 100, 1, 576)).astype(np.float32), rng.normal(size=(8, 1, 4, 576)).astype(np.float32)

    def step(cache, prompt, q):
        cache = cache.append(prompt)
        return jfm.flash_mla_with_kvcache(q, cache.layer_pages(0), cache.block_table, cache.seqlens, 512), cache

    sharded = sharding.shard_cache(cache, mesh, "data")
    assert sharded.pages.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 5)
    got = run_without_collectives(step, sharded, *put(mesh, (prompt, P("data")), (q, P("data", None, "model"))))
    assert_same(got, step(cache, prompt, q))


def test_check_block_table():
    cache = jfm.PagedKVCache.create(batch_size=8, max_seq_len=130, head_dim=8, dtype=jnp.float32)
    sharding.check_block_table(cache.block_table, cache.pages.shape[1], 4)  # rows 2i, 2i+1 own pages 6i..6i+5
    table = np.asarray(cache.block_table).copy()
    table[3, 1] = 0
    table[5, 2] = -1  # invalid ids are never foreign
    with pytest.raises(ValueError, match=r"block_table\[3, 1\] = 0 lies outside the page shard of row 3 "
                                         r"\(pages \[6, 12\)\)"):
        sharding.check_block_table(table, 24, 4)
    with pytest.raises(ValueError, match="must divide evenly into 3 shards"):
        sharding.check_block_table(table, 24, 3)


@pytest.mark.parametrize("flag", ["data2", "data=0", "data=2,data=1", "data=x", f"data={len(jax.devices()) + 1}"])
def test_mesh_flag_errors(flag):
    with pytest.raises(ValueError, match="mesh"):
        sharding.mesh_from_flag(flag)
