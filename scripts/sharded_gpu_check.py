"""Sharded MLA decode on 2 GPUs against one GPU, on the same inputs: equality, compiled program, timings.

Usage, on a machine with 2 GPUs after `pip install --no-build-isolation .`, from the repository root:
  python scripts/sharded_gpu_check.py [--batch 128] [--seqlen 4096] [--heads 128] [--s-q 1] [--iters 50]
Runs (bfloat16, h_kv = 1, d = 576):
  1gpu           flash_mla_with_kvcache on GPU 0
  data=2         batch, block_table, cache_seqlens and the page pool split over 2 GPUs
  model=2        heads split over 2 GPUs, the pool replicated
  ... schedule given   the same with get_mla_metadata's global schedule passed in (replaced per shard)
  step data=2    a decode step as the Flax module runs it (cache write, then decode), against the same on 1 GPU
For each: the largest difference from the 1-GPU result, whether out/lse are within tests/tolerances.py's bound
of the float32 reference, whether the compiled program holds a collective (it must not) and the FFI kernels
(it must, on GPUs), and the median time per call. Prints a Markdown table for benchmarks/RESULTS.md; exits 1 if
a check fails. With XLA_FLAGS=--xla_force_host_platform_device_count=2 and small sizes it also runs on a CPU
(the reference path), which checks the script itself.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# This checkout's package (it finds the installed CUDA extension) and tests/tolerances.py.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import jax_flashmla as jfm  # noqa: E402
from jax_flashmla.reference import mla_decode_reference  # noqa: E402
from tolerances import assert_lse_close, assert_out_close  # noqa: E402  (the project's one tolerance)

COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter|"
                        r"collective-broadcast|send|recv)(-start)?\(")
PAGE = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="sequences (even; default 128)")
    p.add_argument("--seqlen", type=int, default=4096, help="mean KV length (default 4096)")
    p.add_argument("--heads", type=int, default=128, help="query heads h_q (even; default 128)")
    p.add_argument("--s-q", type=int, default=1, help="query tokens per sequence (default 1)")
    p.add_argument("--iters", type=int, default=50, help="calls per timing sample (default 50)")
    p.add_argument("--repeats", type=int, default=5, help="timing samples, the median is reported (default 5)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(args, devices):
    """Batch half i keeps its pages in pool half i (scattered inside it): the layout data=2 needs."""
    rng = np.random.default_rng(args.seed)
    seqlens = np.clip(rng.normal(args.seqlen, args.seqlen / 4, args.batch), 1, 2 * args.seqlen).astype(np.int32)
    seqlens[rng.integers(args.batch)] = 0  # one empty sequence: out 0, lse +inf
    pages_needed = -(-(seqlens + 1) // PAGE)  # + 1: room for the decode step's new token
    halves = np.split(np.arange(args.batch), 2)
    per_half = max(int(pages_needed[h].sum()) for h in halves)
    table = np.full((args.batch, int(pages_needed.max())), -1, np.int32)
    owned = np.zeros((2 * per_half, PAGE), bool)
    for half, rows in enumerate(halves):
        free = half * per_half + rng.permutation(per_half)
        cursor = 0
        for i in rows:
            n = pages_needed[i]
            table[i, :n] = free[cursor:cursor + n]
            cursor += n
            for j in range(n):
                owned[table[i, j], :max(min(PAGE, seqlens[i] - j * PAGE), 0)] = True
    kq, kk, kv = jax.random.split(jax.random.key(args.seed), 3)
    with jax.default_device(devices[0]):
        q = (jnp.clip(jax.random.normal(kq, (args.batch, args.s_q, args.heads, 576)) / 10, -1, 1)).astype(jnp.bfloat16)
        pool = (jax.random.normal(kk, (2 * per_half, PAGE, 1, 576)) / 10).astype(jnp.bfloat16)
        pool = jnp.where(jnp.asarray(owned)[:, :, None, None], pool, jnp.nan).astype(jnp.bfloat16)  # unowned: NaN
        new_kv = (jax.random.normal(kv, (args.batch, 1, 1, 576)) / 10).astype(jnp.bfloat16)
    return q, pool, jnp.asarray(table), jnp.asarray(seqlens), new_kv


def decode(q, k_cache, block_table, cache_seqlens):
    return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, causal=True)


def decode_given_schedule(q, k_cache, block_table, cache_seqlens):
    """model.py's pattern: the global schedule computed once per step and passed in. Under a split each shard
    recomputes its own, and XLA must drop the global one (with any gather of the lengths it needed)."""
    md, splits = jfm.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1)
    return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, md, splits, causal=True)


def decode_step(pages, block_table, seqlens, q, kv):
    """mla_module's decode: store the new token's latent at seqlens, then attend over seqlens + 1 tokens,
    reading layer 0 of the stacked pool in place as mla_module does."""
    cache = jfm.PagedKVCache(pages=pages, block_table=block_table, seqlens=seqlens).write(kv)
    out, lse = jfm.flash_mla_with_kvcache(q, cache.pages, cache.block_table, cache.seqlens + 1, 512, causal=True,
                                          layer=0)
    return out, lse, cache.pages


def compile_and_time(f, args, iters, repeats):
    compiled = jax.jit(f).lower(*args).compile()
    text = compiled.as_text()
    result = jax.block_until_ready(compiled(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            last = compiled(*args)
        jax.block_until_ready(last)
        samples.append((time.perf_counter() - start) / iters)
    collectives = sorted({m.group(1) for m in COLLECTIVE.finditer(text)})
    kernels = "jax_flashmla_mla_decode" in text
    return result, statistics.median(samples) * 1e3, collectives, kernels


def max_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf
        return _max_diff(a, b)


def _max_diff(a, b):
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities (empty sequences' lse) count as 0
    return float(np.max(np.where(same, 0.0, np.abs(a - b)), initial=0.0))


def within_reference(out, lse, ref):
    try:
        assert_out_close(out, ref[0], jnp.bfloat16)
        assert_lse_close(lse, ref[1])
        return "yes"
    except AssertionError as error:
        return f"NO ({str(error).splitlines()[0][:80]})"


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = jax.devices()
    print(f"jax {jax.__version__}, devices: {devices}, kernels: {jfm.kernels_available()}")
    if len(devices) < 2 or args.batch % 2 or args.heads % 2:
        print("needs 2 devices, an even --batch and even --heads")
        return 2
    on_gpu = devices[0].platform == "gpu"
    q, pool, table, seqlens, new_kv = make_inputs(args, devices)
    print(f"batch {args.batch}, s_q {args.s_q}, h_q {args.heads}, mean seqlen {args.seqlen}, pool {pool.shape[0]} "
          f"pages ({pool.size * 2 / 2**30:.2f} GiB)")

    with jax.default_device(devices[0]):
        softmax_scale = 576 ** -0.5
        ref = jax.jit(lambda q, k, t, s: mla_decode_reference(
            q.astype(jnp.float32), k.astype(jnp.float32), t, s, head_dim_v=512, softmax_scale=softmax_scale,
            causal=True))(q, pool, table, seqlens)
        ref_step = jax.jit(lambda p, t, s, q, kv: decode_step(p.astype(jnp.float32), t, s, q.astype(jnp.float32),
                                                              kv.astype(jnp.float32)))(pool[None], table, seqlens, q,
                                                                                       new_kv)

    rows, failures = [], 0

    def record(name, mesh_shape, got, want, reference, ms, collectives, kernels, pages=None):
        nonlocal failures
        close = within_reference(got[0], got[1], reference)
        pages_ok = "" if pages is None else (" pages equal" if max_diff(got[2], pages) == 0 else " PAGES DIFFER")
        ok = close == "yes" and not collectives and (kernels or not on_gpu) and "DIFFER" not in pages_ok
        failures += not ok
        rows.append(f"| {name} | {mesh_shape} | {max_diff(got[0], want[0]):.3g} | {max_diff(got[1], want[1]):.3g} | "
                    f"{close}{pages_ok} | {', '.join(collectives) or 'none'} | {'yes' if kernels else 'no'} | "
                    f"{ms:.3f} |")

    single_args = jax.device_put((q, pool, table, seqlens), devices[0])
    base, base_ms, coll, kern = compile_and_time(decode, single_args, args.iters, args.repeats)
    record("1gpu", "-", base, base, ref, base_ms, coll, kern)

    for name, f, shape, q_spec, pool_spec in [
            ("data=2", decode, (2, 1), P("data"), P("data")),
            ("data=2 schedule given", decode_given_schedule, (2, 1), P("data"), P("data")),
            ("model=2", decode, (1, 2), P(None, None, "model"), P()),
            ("model=2 schedule given", decode_given_schedule, (1, 2), P(None, None, "model"), P())]:
        mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices[:2])
        sharded = tuple(jax.device_put(x, NamedSharding(mesh, s)) for x, s in
                        ((q, q_spec), (pool, pool_spec), (table, P("data")), (seqlens, P("data"))))
        got, ms, coll, kern = compile_and_time(f, sharded, args.iters, args.repeats)
        record(name, shape, got, base, ref, ms, coll, kern)

    step_single = jax.device_put((pool[None], table, seqlens, q, new_kv), devices[0])
    step_base, step_ms, coll, kern = compile_and_time(decode_step, step_single, args.iters, args.repeats)
    record("step 1gpu", "-", step_base, step_base, ref_step, step_ms, coll, kern, pages=step_base[2])
    mesh = jax.make_mesh((2, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices[:2])
    step_sharded = tuple(jax.device_put(x, NamedSharding(mesh, s)) for x, s in
                         zip(step_single, (P(None, "data"), P("data"), P("data"), P("data"), P("data"))))
    got, ms, coll, kern = compile_and_time(decode_step, step_sharded, args.iters, args.repeats)
    record("step data=2", (2, 1), got, step_base, ref_step, ms, coll, kern, pages=step_base[2])

    print("\n| run | mesh (data, model) | max abs diff out vs 1 GPU | max abs diff lse vs 1 GPU | within reference "
          "tolerance | collectives in HLO | FFI kernels in HLO | ms / call |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{'FAIL' if failures else 'OK'}: {failures} failed check(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
