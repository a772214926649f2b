"""SPMD partitioning of MLA decode and of cache writes: `jax.jit` over a Mesh with NamedSharding'd inputs
runs the same per-device kernels on every shard, with no communication.

Layouts. B and H are the batch axes and the head axes: any two disjoint sets of mesh axes (each possibly
empty, e.g. B = ("data",), H = ("model",)). They are read from the inputs' shardings, so no mesh or axis
name is passed to the public functions.

  q              (b, s_q, h_q, d)          P(B, None, H, None)
  out            (b, s_q, h_q, dv)         P(B, None, H, None)
  lse            (b, h_q, s_q)             P(B, H, None)
  block_table    (b, max_pages)            P(B, None)
  cache_seqlens  (b,)                      P(B)
  k_cache        (num_pages, 64, h_kv, d)  P(B, None, None, None), or fully replicated; a stacked pool
                 (num_layers, num_pages, 64, h_kv, d) likewise on its page axis: P(None, B, None, None, None)
  PagedKVCache   pages P(None, B, None, None, None), block_table P(B, None), seqlens P(B); for a write,
                 kv (b, s_new, h_kv, d) P(B, None, None, None) (or the rows all replicated, each shard then
                 storing the tokens that land on its pages)

block_table keeps global page ids. Batch shard i must reference only pages of page shard i (the pages
[i * n, (i + 1) * n) with n = num_pages / |B|), which PagedKVCache.create's default table satisfies when
both axes divide evenly; each shard rebases its ids onto its local pool, and an id of another shard's
pages reads as an invalid id there (its tokens are ignored by the decode and dropped by writes).
An argument left replicated where the layout splits it is sliced locally, which costs no communication.
Any other split (over other axes, or of a head dim, a page's slots, s_q), or a size that does not divide,
raises a ValueError naming the argument and the layouts above. Splitting heads needs h_kv == 1 (MLA's shared
latent). shard_cache places a PagedKVCache in this layout (checking the block_table precondition), and
mesh_from_flag builds the mesh from a "data=2,model=1" flag.

Scheduling. The split-KV schedule is computed inside each shard, from the shard's own cache_seqlens and head
count, with num_parts sized for the shard's device. A tile_scheduler_metadata / num_splits passed in is
used as is only when nothing is split (it describes the global batch); otherwise it is ignored.

Why custom_partitioning (and not shard_map): with custom_partitioning XLA's SPMD partitioner calls back
into Python with the operands' actual shardings, so calling flash_mla_with_kvcache / PagedKVCache.write
inside any `jax.jit` just works, whatever mesh axis names the user picked, and unsupported layouts are
reported with the argument's name. shard_map would need the mesh and axis names passed explicitly to every
call. Both JAX 0.10 and 0.11 default to the Shardy partitioner, which takes the einsum-like
`sharding_rule` given below (the GSPMD callbacks are deprecated and not provided).
custom_partitioning has no vmap rule, so each partitioned function is wrapped in custom_vmap, whose rule
vmaps the per-device function (vmap under a mesh therefore partitions through XLA's defaults).
Errors from a rule surface when the jitted function is compiled, as a JaxRuntimeError carrying the message.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from .primitives import bind_schedule, device_num_sms, mla_decode_p

DECODE_LAYOUTS = (
    "supported layouts, with B the batch axes and H the head axes (disjoint sets of mesh axes, either may be "
    "empty): q P(B, None, H, None); block_table P(B, None); cache_seqlens P(B); k_cache P(B, None, None, None) "
    "(a stacked pool P(None, B, None, None, None)) or replicated; arguments left replicated are sliced locally; "
    "H non-empty needs h_kv == 1")
WRITE_LAYOUTS = (
    "supported layouts, with B the batch axes: pages P(None, B, None, None, None); kv P(B, None, None, None); "
    "block_table P(B, None); seqlens P(B); kv, block_table and seqlens may instead all be replicated")

# ----------------------------------------------------------------------------------------------------
# Layout analysis: PartitionSpecs in, the batch / head / pool axes out, or a ValueError.


def _dim_axes(sharding, ndim: int) -> tuple[tuple[str, ...], ...]:
    """Per dimension, the mesh axes it is split over (() where it is not)."""
    if not isinstance(sharding, NamedSharding):
        raise ValueError(f"jax_flashmla's partitioning rules need NamedSharding operands, got {sharding}")
    entries = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries)


def _show(axes) -> str:
    return "P(" + ", ".join("None" if not a else repr(a[0]) if len(a) == 1 else repr(a) for a in axes) + ")"


class _Operands:
    """The operands' split axes by name, and error messages that name them."""

    def __init__(self, function: str, layouts: str, names, shapes):
        self.function, self.layouts = function, layouts
        self.axes = {n: _dim_axes(s.sharding, len(s.shape)) for n, s in zip(names, shapes)}
        self.shapes = {n: tuple(s.shape) for n, s in zip(names, shapes)}

    def fail(self, name: str, why: str):
        raise ValueError(f"{self.function}: {name} is sharded as {_show(self.axes[name])}, which {why}; "
                         f"{self.layouts}")

    def require_unsplit(self, name: str, dims, what: str):
        for dim in dims:
            if self.axes[name][dim]:
                self.fail(name, f"splits its {what[dim]} axis; that cannot be served without communication")

    def agree(self, role: str, candidates) -> tuple[str, ...]:
        """The one non-empty axis set among (name, dim) candidates; every split one must use it."""
        chosen, source = (), None
        for name, dim in candidates:
            axes = self.axes[name][dim]
            if not axes:
                continue
            if chosen and axes != chosen:
                self.fail(name, f"splits its {role} axis over {axes} while {source} uses {chosen}")
            chosen, source = axes, name
        return chosen

    def divisible(self, name: str, dim: int, axes, mesh, what: str):
        parts = math.prod(mesh.shape[a] for a in axes)
        if self.shapes[name][dim] % parts:
            raise ValueError(f"{self.function}: {name}'s {what} ({self.shapes[name][dim]}) must divide evenly "
                             f"over the mesh axes {axes} ({parts} shards); {self.layouts}")


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    batch: tuple[str, ...]  # B: splits q, out, lse, block_table, cache_seqlens
    heads: tuple[str, ...]  # H: splits q's, out's and lse's head axis
    pool: tuple[str, ...]  # k_cache's page axis: B, or () for a replicated pool

    @property
    def splits_anything(self) -> bool:
        return bool(self.batch or self.heads)


def decode_layout(mesh, arg_shapes) -> DecodeLayout:
    """arg_shapes: q, k_cache, block_table, cache_seqlens (+ metadata, not inspected), each with .sharding."""
    ops = _Operands("flash_mla_with_kvcache", DECODE_LAYOUTS, ("q", "k_cache", "block_table", "cache_seqlens"),
                    arg_shapes[:4])
    ops.require_unsplit("q", (1, 3), {1: "s_q", 3: "head dim"})
    # A stacked pool (num_layers, num_pages, ...) has its page axis at 1; only the page axis may be split.
    k_axes = ("layer",) * (len(arg_shapes[1].shape) == 5) + ("page", "page-slot", "KV-head", "head dim")
    page_axis = k_axes.index("page")
    ops.require_unsplit("k_cache", [a for a in range(len(k_axes)) if a != page_axis], dict(enumerate(k_axes)))
    ops.require_unsplit("block_table", (1,), {1: "max_pages_per_seq"})
    batch = ops.agree("batch", (("q", 0), ("block_table", 0), ("cache_seqlens", 0)))
    pool = ops.axes["k_cache"][page_axis]
    if pool and pool != batch:
        if batch:
            ops.fail("k_cache", f"splits its page axis over {pool} while the batch is split over {batch} "
                     "(the pool must be split over the batch axes, or replicated)")
        batch = pool  # q, block_table and cache_seqlens are replicated: slice them like the pool
    heads = ops.axes["q"][2]
    if heads and set(heads) & set(batch):
        ops.fail("q", f"splits heads over {heads}, which overlap the batch axes {batch}")
    if heads and arg_shapes[1].shape[-2] != 1:
        ops.fail("q", f"splits its heads over {heads} but k_cache has h_kv = {arg_shapes[1].shape[-2]} "
                 "(a head split needs h_kv == 1, the latent shared by all heads)")
    ops.divisible("q", 0, batch, mesh, "batch size")
    ops.divisible("q", 2, heads, mesh, "head count")
    ops.divisible("k_cache", page_axis, pool, mesh, "page count")
    return DecodeLayout(batch=batch, heads=heads, pool=pool)


def write_layout(mesh, pages, kv, page_ids, slots) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(batch axes of kv and its rows' page ids, axes of the pool's page axis) of a cache write.

    A split pool with replicated rows needs no precondition: every shard scans all rows and keeps the tokens
    that land on its pages. A replicated pool with split rows is refused: each shard would write only its own
    rows into its copy, and keeping the copies equal needs communication.
    """
    # The page ids and slots of the new tokens are computed row by row from block_table and seqlens.
    ids, slot = "page ids (from block_table)", "slots (from seqlens)"
    ops = _Operands("PagedKVCache.write", WRITE_LAYOUTS, ("pages", "kv", ids, slot), (pages, kv, page_ids, slots))
    ops.require_unsplit("pages", (0, 2, 3, 4), {0: "layer", 2: "page-slot", 3: "KV-head", 4: "head dim"})
    ops.require_unsplit("kv", (1, 2, 3), {1: "token", 2: "KV-head", 3: "head dim"})
    ops.require_unsplit(ids, (1,), {1: "token"})
    ops.require_unsplit(slot, (1,), {1: "token"})
    batch = ops.agree("batch", (("kv", 0), (ids, 0), (slot, 0)))
    pool = ops.axes["pages"][1]
    if batch and pool != batch:
        ops.fail("pages", f"splits its page axis over {pool or 'no mesh axes'} while the batch is split over "
                 f"{batch}; the pool must be split over the batch axes (replicated copies would diverge)")
    ops.divisible("kv", 0, batch, mesh, "batch size")
    ops.divisible("pages", 1, pool, mesh, "page count")
    return batch, pool


# ----------------------------------------------------------------------------------------------------
# Explicit mesh axes (jax.make_mesh's default): there shardings are part of the types at trace time, and the
# few global operations need them spelled out.


def explicit_sharding(x) -> NamedSharding | None:
    """x's sharding when its type carries one over Explicit mesh axes, else None (Auto axes, one device)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or AxisType.Explicit not in sharding.mesh.axis_types:
        return None
    return sharding


def gathered(x):
    """x whole on every device. A global computation (the schedule of the whole batch) needs this under
    Explicit axes; if nothing reads the result (the decode recomputes per shard) XLA drops the all-gather."""
    sharding = explicit_sharding(x)
    if sharding is None or not any(sharding.spec):
        return x
    return jax.sharding.reshard(x, sharding.update(spec=P()))


def under_auto_axes(f, q, *args, out_specs):
    """f(q, *args) for plain-jnp computations such as sparse attention, whose gathers XLA partitions by itself over
    Auto mesh axes but which Explicit axes would make ambiguous: where any argument is on Explicit axes it runs
    with them switched to Auto, and its results come back split as out_specs(q's spec, padded with None to q's
    rank) says. Elsewhere f runs as it is."""
    shardings = [explicit_sharding(x) for x in jax.tree.leaves((q, args))]  # q's first
    found = [s for s in shardings if s is not None]
    if not found:
        return f(q, *args)
    # q may be unplaced (replicated) while another argument carries the Explicit mesh.
    q_spec = () if shardings[0] is None else tuple(shardings[0].spec)
    spec = q_spec + (None,) * (q.ndim - len(q_spec))
    out_sharding = jax.tree.map(lambda s: found[0].update(spec=s), out_specs(spec), is_leaf=lambda x: isinstance(x, P))
    return jax.sharding.auto_axes(f, out_sharding=out_sharding)(q, *args)


def rows_placed_like(per_row, rows):
    """A per-row array (b, ...) split on its first axis as `rows` (b, ...) is under Explicit axes (vmap over page
    shards wants its mapped inputs split alike); as it is elsewhere."""
    sharding = explicit_sharding(rows)
    if sharding is None:
        return per_row
    spec = P(*((tuple(sharding.spec) + (None,))[:1] + (None,) * (per_row.ndim - 1)))
    current = explicit_sharding(per_row)
    if current is not None and P(*(tuple(current.spec) + (None,) * per_row.ndim)[: per_row.ndim]) == spec:
        return per_row
    return jax.sharding.reshard(per_row, sharding.update(spec=spec))


def split_like_heads(per_head, lse):
    """A (h_q,) array split as lse's head axis (lse is (b, h_q, s_q)) under Explicit axes, so that an elementwise
    epilogue pairs each head with its own; as it is elsewhere. Replicated in, it is a local slice, no collective."""
    lse_sharding = explicit_sharding(lse)
    if lse_sharding is None:
        return per_head
    spec = tuple(lse_sharding.spec) + (None,) * 3
    current = explicit_sharding(per_head)
    if current is not None and (tuple(current.spec) + (None,))[0] == spec[1]:
        return per_head
    return jax.sharding.reshard(per_head, lse_sharding.update(spec=P(spec[1])))


# ----------------------------------------------------------------------------------------------------
# Inside a shard


def local_page_ids(page_ids, num_local_pages: int, pool_axes, invalid):
    """Global page ids -> ids in this shard's slice of the pool; other shards' pages (and invalid ids) become
    `invalid`. Compares before subtracting so that no id can wrap around into the local range."""
    if not pool_axes:
        return page_ids
    first = jax.lax.axis_index(pool_axes) * num_local_pages
    local = page_ids - first
    return jnp.where((page_ids >= first) & (local < num_local_pages), local, invalid)


def _named(mesh, *dims) -> NamedSharding:
    """NamedSharding from per-dimension axis tuples, () meaning unsplit."""
    return NamedSharding(mesh, P(*[d if d else None for d in dims]))


# ----------------------------------------------------------------------------------------------------
# Decode


def _decode_global(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer, head_dim_v,
                   softmax_scale, causal, poison_outputs):
    out, lse, *_ = mla_decode_p.bind(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer,
                                     head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal,
                                     poison_outputs=poison_outputs)
    return out, lse


# One partitioned function per pool rank: the sharding rule names k_cache's factors (a layer one for stacked).
_decode_partitioned = custom_partitioning(_decode_global, static_argnums=(7, 8, 9, 10))
_decode_partitioned_stacked = custom_partitioning(_decode_global, static_argnums=(7, 8, 9, 10))


def _decode_partition(head_dim_v, softmax_scale, causal, poison_outputs, mesh, arg_shapes, result_shape):
    del result_shape  # the results follow q: whatever was asked of them is resharded by XLA afterwards
    layout = decode_layout(mesh, arg_shapes)
    batch, heads = layout.batch, layout.heads
    spec = functools.partial(_named, mesh)
    stacked = len(arg_shapes[1].shape) == 5
    pool_spec = spec((), layout.pool, (), (), ()) if stacked else spec(layout.pool, (), (), ())
    arg_shardings = (spec(batch, (), heads, ()), pool_spec, spec(batch, ()), spec(batch),
                     # A schedule we use is needed whole; one we ignore stays where it is (XLA drops it).
                     *(s.sharding if layout.splits_anything else spec(*((),) * len(s.shape)) for s in arg_shapes[4:6]),
                     spec())  # the layer index, on every device
    result_shardings = (spec(batch, (), heads, ()), spec(batch, heads, ()))
    num_sms = device_num_sms(mesh.devices.flat[0])  # the shard's schedule fills one of the mesh's GPUs

    def per_shard(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer):
        block_table = local_page_ids(block_table, k_cache.shape[-4], layout.pool, -1)
        if layout.splits_anything:
            _, s_q, h_q, _ = q.shape
            h_kv = k_cache.shape[-2]
            tile_metadata, num_splits = bind_schedule(cache_seqlens, num_sms=num_sms, num_heads_k=h_kv,
                                                      num_q_tokens_per_head_k=s_q * h_q // h_kv)
        return _decode_global(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer, head_dim_v,
                              softmax_scale, causal, poison_outputs)

    return mesh, per_shard, result_shardings, arg_shardings


# Factors: b batch, s query tokens, h heads, d head dim, v value dim, l layers, p pages, t page slots, k KV
# heads, n table width, m/r schedule rows/ints, c num_splits; the layer index is a scalar. Only b and h are
# shared, so propagation splits the results like q and never invents a split of anything else.
_decode_partitioned.def_partition(
    _decode_partition, sharding_rule="b s h d, p t k d, b n, b, m r, c, -> b s h v, b h s")
_decode_partitioned_stacked.def_partition(
    _decode_partition, sharding_rule="b s h d, l p t k d, b n, b, m r, c, -> b s h v, b h s")


# jit: an eager call on sharded arrays then compiles through the partitioning rule too (inside an outer jit
# this nests and inlines).
@functools.partial(jax.jit, static_argnames=("head_dim_v", "softmax_scale", "causal", "poison_outputs"))
def decode(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer, *, head_dim_v: int,
           softmax_scale: float, causal: bool, poison_outputs: bool):
    """(out, lse) of mla_decode_p, partitioned over the mesh of the operands' shardings (module docstring).
    layer: () int32, the layer of a stacked (num_layers, num_pages, 64, h_kv, d) pool to read (0 otherwise)."""
    static = (head_dim_v, softmax_scale, causal, poison_outputs)
    partitioned = _decode_partitioned_stacked if k_cache.ndim == 5 else _decode_partitioned

    @custom_vmap
    def run(*operands):
        return partitioned(*operands, *static)

    @run.def_vmap
    def _vmap_rule(axis_size, in_batched, *operands):
        del axis_size
        in_axes = [0 if batched else None for batched in in_batched]
        # mla_decode_p's batching rule folds the mapped axis into one launch.
        out = jax.vmap(lambda *args: _decode_global(*args, *static), in_axes=in_axes)(*operands)
        return out, (True, True)

    return run(q, k_cache, block_table, cache_seqlens, tile_metadata, num_splits, layer)


# ----------------------------------------------------------------------------------------------------
# Cache writes


def _scatter_global(pages, kv, page_ids, slots, layer):
    """pages[layer, page_ids[i, j], slots[i, j]] = kv[i, j]; out-of-range page ids are dropped."""
    layer_index = jnp.full_like(page_ids, layer)
    return pages.at[layer_index, page_ids, slots].set(kv.astype(pages.dtype), mode="drop",
                                                      out_sharding=explicit_sharding(pages))


_scatter_partitioned = custom_partitioning(_scatter_global)


def _scatter_partition(mesh, arg_shapes, result_shape):
    del result_shape
    pages, kv, page_ids, slots, _ = arg_shapes
    batch, pool_axes = write_layout(mesh, pages, kv, page_ids, slots)
    spec = functools.partial(_named, mesh)
    pool = spec((), pool_axes, (), (), ())
    arg_shardings = (pool, spec(batch, (), (), ()), spec(batch, ()), spec(batch, ()), spec())

    def per_shard(pages, kv, page_ids, slots, layer):
        num_local_pages = pages.shape[1]
        page_ids = local_page_ids(page_ids, num_local_pages, pool_axes, num_local_pages)  # out of range: dropped
        return _scatter_global(pages, kv, page_ids, slots, layer)

    return mesh, per_shard, pool, arg_shardings


# Factors: l layers, p pages, t page slots, k KV heads, d head dim, b batch, s new tokens; layer is a scalar.
_scatter_partitioned.def_partition(_scatter_partition, sharding_rule="l p t k d, b s k d, b s, b s, -> l p t k d")


def _with_vmap_rule(global_fn, partitioned):
    """partitioned (a custom_partitioning of global_fn, one result) with a vmap rule, which it lacks: under vmap,
    global_fn vmapped, partitioned by XLA's defaults."""
    @custom_vmap
    def run(*operands):
        return partitioned(*operands)

    @run.def_vmap
    def _vmap_rule(axis_size, in_batched, *operands):
        del axis_size
        in_axes = [0 if batched else None for batched in in_batched]
        return jax.vmap(global_fn, in_axes=in_axes)(*operands), True

    return run


_scatter = _with_vmap_rule(_scatter_global, _scatter_partitioned)


@jax.jit  # as decode's
def scatter_tokens(pages, kv, page_ids, slots, layer):
    """PagedKVCache.write's scatter: pages (L, P, 64, h_kv, d), kv (b, s, h_kv, d), page_ids/slots (b, s) int32
    (page ids outside [0, P) are dropped), layer () int32. Partitioned like the decode (module docstring)."""
    return _scatter(pages, kv, page_ids, slots, layer)


# ----------------------------------------------------------------------------------------------------
# Page copies (PagedKVCache.fork: a row's own copy of a shared partial page)


def _copy_global(pages, copy_from, copy_to):
    """pages[:, copy_to[i]] = pages[:, copy_from[i]] for every layer; copy_to outside [0, P) is dropped."""
    num_pages = pages.shape[1]
    source = pages.at[:, jnp.clip(copy_from, 0, num_pages - 1)].get(out_sharding=explicit_sharding(pages))
    return pages.at[:, copy_to].set(source, mode="drop", out_sharding=explicit_sharding(pages))


_copy_partitioned = custom_partitioning(_copy_global)


def _copy_partition(mesh, arg_shapes, result_shape):
    del result_shape
    pages, copy_from, copy_to = arg_shapes
    ops = _Operands("PagedKVCache.fork", WRITE_LAYOUTS, ("pages", "copy_from", "copy_to"), (pages, copy_from, copy_to))
    ops.require_unsplit("pages", (0, 2, 3, 4), {0: "layer", 2: "page-slot", 3: "KV-head", 4: "head dim"})
    batch = ops.agree("batch", (("copy_from", 0), ("copy_to", 0)))
    pool_axes = ops.axes["pages"][1]
    if batch and pool_axes != batch:
        ops.fail("pages", f"splits its page axis over {pool_axes or 'no mesh axes'} while the batch is split over "
                 f"{batch}; the pool must be split over the batch axes")
    spec = functools.partial(_named, mesh)
    pool = spec((), pool_axes, (), (), ())
    arg_shardings = (pool, spec(batch), spec(batch))

    def per_shard(pages, copy_from, copy_to):
        # fork copies within a page shard: both ids local here, or the copy is another shard's (dropped here).
        num_local_pages = pages.shape[1]
        local_to = local_page_ids(copy_to, num_local_pages, pool_axes, num_local_pages)
        local_from = local_page_ids(copy_from, num_local_pages, pool_axes, num_local_pages)
        return _copy_global(pages, local_from, jnp.where(local_from < num_local_pages, local_to, num_local_pages))

    return mesh, per_shard, pool, arg_shardings


# Factors: l layers, p pages, t page slots, k KV heads, d head dim, b rows.
_copy_partitioned.def_partition(_copy_partition, sharding_rule="l p t k d, b, b -> l p t k d")


_copy = _with_vmap_rule(_copy_global, _copy_partitioned)


@jax.jit  # as decode's
def copy_pages(pages, copy_from, copy_to):
    """PagedKVCache.fork's page copies: pages (L, P, 64, ...) with pages[:, copy_to[i]] = pages[:, copy_from[i]]
    for copy_to[i] in [0, P) (b,) int32. Partitioned like a write: each shard copies within its own pages."""
    return _copy(pages, copy_from, copy_to)


# ----------------------------------------------------------------------------------------------------
# Placing things on a mesh


def mesh_from_flag(flag: str, devices=None) -> jax.sharding.Mesh:
    """"data=2,model=1" -> a Mesh with those axes (Auto axis types) over the first devices."""
    try:
        pairs = [item.split("=") for item in flag.replace(" ", "").split(",")]
        names, sizes = zip(*((name, int(size)) for name, size in pairs))
    except ValueError:
        raise ValueError(f"a mesh is given as name=size pairs, e.g. data=2,model=1; got {flag!r}") from None
    if len(set(names)) != len(names) or min(sizes) < 1 or not all(names):
        raise ValueError(f"mesh axes need distinct names and positive sizes, got {flag!r}")
    devices = jax.devices() if devices is None else devices
    if math.prod(sizes) > len(devices):
        raise ValueError(f"mesh {flag!r} needs {math.prod(sizes)} devices, {len(devices)} available")
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices[:math.prod(sizes)])


def check_block_table(block_table, num_pages: int, shards: int):
    """The precondition of a batch split into `shards`: row i's valid page ids lie in its page shard."""
    table = np.asarray(block_table)
    batch = table.shape[0]
    if batch % shards or num_pages % shards:
        raise ValueError(f"batch ({batch}) and num_pages ({num_pages}) must divide evenly into {shards} shards")
    shard_of_row = np.arange(batch)[:, None] // (batch // shards)
    valid = (table >= 0) & (table < num_pages)
    foreign = valid & (table // (num_pages // shards) != shard_of_row)
    if foreign.any():
        row, col = map(int, np.argwhere(foreign)[0])
        raise ValueError(f"block_table[{row}, {col}] = {table[row, col]} lies outside the page shard of row {row} "
                         f"(pages [{shard_of_row[row, 0] * (num_pages // shards)}, "
                         f"{(shard_of_row[row, 0] + 1) * (num_pages // shards)})); split over {shards} shards, "
                         "each batch shard must keep its pages in its own page shard")


def shard_cache(cache, mesh, batch_axes="data"):
    """A PagedKVCache placed on `mesh`: rows and the page pool split over batch_axes (a name or a tuple of
    names), replicated over the other axes. Checks the block_table precondition on the host first."""
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    check_block_table(cache.block_table, cache.pages.shape[1], shards)
    rows, pools = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P(None, axes))
    index_pages = None if cache.index_pages is None else jax.device_put(cache.index_pages, pools)
    free_pages, free_count = cache.free_pages, cache.free_count
    if free_pages is not None:  # on-demand paging: one free stack per page shard, on the devices of that shard
        if free_pages.shape[0] != shards:
            raise ValueError(f"an on-demand cache split over {shards} batch shards needs page_shards={shards} (one "
                             f"free stack a shard, so that rows take pages of their own shard), got "
                             f"{free_pages.shape[0]}: create it with page_shards={shards}")
        free_pages, free_count = jax.device_put(free_pages, rows), jax.device_put(free_count, rows)
    return dataclasses.replace(cache, pages=jax.device_put(cache.pages, pools), index_pages=index_pages,
                               block_table=jax.device_put(cache.block_table, rows),
                               seqlens=jax.device_put(cache.seqlens, rows), free_pages=free_pages,
                               free_count=free_count)
