"""`python -m jax_flashmla.bench`: time MLA decode on FlashMLA's benchmark grid and against plain XLA.

The default grid is FlashMLA's: b 128, h_kv 1, d 576, dv 512, page 64, bf16, per-sequence lengths drawn from
N(s_k, s_k / 2) and clipped to [s_q, 2 s_k], s_k in {4096, 8192, 16384, 32768}, s_q in {1, 2},
h_q in {16, 64, 128}, causal off and on (on only where s_q > 1). Inputs are made on the device; each
sequence's pages are scattered over the pool by a random permutation (as in FlashMLA's tests), or, with
--page-order contiguous, laid out in order, one sequence after the other (as in FlashMLA's benchmark script,
whose block table is an arange). The pool holds b * s_k * 576 * 2 bytes
(600 MB at s_k 4096), far more than a Hopper GPU's 50-60 MB L2, so each call reads the KV from HBM.

How each row is timed:
  kernel_ms    the decode alone, metadata computed once beforehand (as a model does once per step for all
               its layers), as the device ran it: one jitted function runs the decode n = --iters times in
               `lax.fori_loop`, the decode under jax.named_scope(TIMED_SCOPE); --repeats calls of it run
               under JAX's profiler (CUPTI), and each decode's time is the span of its kernels on the
               device timeline, from the split-KV kernel's start to the combine's end
               (jax_flashmla.device_timing). kernel_ms is the median over the n * repeats decodes: what CUDA
               events around each call would measure (FlashMLA's benchmark), without launch or dispatch.
               kernel_tail_ms (JSON and CSV only) is the median time from the end of the decode's split-KV
               kernel to the decode's end: what the combine adds, its launch gap included.
               Where the profiler has no device timeline (CPU runs), or its spans hold less than a tenth of
               loop_ms (kernels it did not attribute to the scope, as in the XLA sparse path's loops),
               kernel_ms is loop_ms instead, and the record's kernel_timing says which it is ("profiler" or
               "wall-loop").
  loop_ms      wall clock per decode of that loop: median over repeats of (t(n) - t(1)) / (n - 1), ended
               by block_until_ready, which cancels dispatch and synchronisation. Each iteration adds
               0 * out[0, 0, 0, 0] to q[0, 0, 0, 0] and to block_table[0, 0], as one layer feeds the next,
               so XLA can neither merge the calls nor hoist loop-invariant work (such as the baseline's page
               gather) out of the loop, and `out` is loop-carried so every iteration must compute all of it.
               So loop_ms also counts that bookkeeping: on an H100, XLA copies all of q each iteration (about
               25 us at b 128, s_q 2, h_q 128), 20-110 us in all beyond the decode's own kernels.
               loop_ms is taken just before kernel_ms: on the compute-bound rows, which run the H100 at its
               700 W cap, the clock drifts between the two, and on 2026-11-23 kernel_ms came out anywhere
               from 6% below to 4% above loop_ms (benchmarks/RESULTS.md).
  e2e_ms       median wall time of single jitted calls of metadata + decode: what one call costs from
               Python, dispatch included.
  baseline_ms  `xla_baseline_decode` (gather the pages, einsum, softmax in the input dtype with f32 scores,
               padded to the longest sequence), timed like kernel_ms (--baseline-iters decodes a loop), its
               wall-clock loop time in baseline_loop_ms. On the H100 with jax 0.11 XLA runs that loop's body
               as one CUDA graph (a command buffer), whose kernels the profiler attributes to the graph, not
               to the scope: baseline_timing is then "wall-loop", which also counts the loop's own work (about
               50 us, under 2% of the baseline's time). speedup = baseline_ms / kernel_ms.
With --layers N > 1 the KV pool is a stack of N layers, as a model keeps it (PagedKVCache.pages), and every
decode reads the last layer in place (flash_mla_with_kvcache(..., layer=N-1)); the row then also has
  e2e_sliced_ms  e2e_ms of the same call given the layer sliced out, pages[N-1], FlashMLA's one-layer
               k_cache: what slicing adds to a call, if XLA copies the slice (jax 0.11 does not).
Throughput uses FlashMLA's formulas with L the mean length: FLOPs = b h_q s_q (2 d L + 2 dv L),
bytes = b (s_q h_q d + L h_kv d + s_q h_q dv) * 2 (bytes per element). "% roofline" is the time floor
max(FLOPs / peak FLOP/s, bytes / peak bytes/s) over kernel_ms, with the datasheet peaks of the GPU JAX sees
(KNOWN_GPUS, matched by its device kind: H100 SXM or PCIe, H800, H200, H20), those of an H100 SXM for any other
device, or --peak-tflops / --peak-gbps.

With --sparse-topk K the rows time DeepSeek-V3.2's sparse decode instead (flash_mla_with_kvcache with indices=):
each query token attends to K distinct positions of its sequence drawn at random, through the block table, from
the same pool (--fp8: packed in the FP8 layout first). It has no CUDA kernel yet and runs in XLA, so these rows
are not kernel numbers (kernels_used false) and have no baseline; their counts are FLOPs = b s_q h_q K (2 d + 2 dv)
and bytes = b s_q (h_q (d + dv) * 2 + K * token bytes), 656 bytes a token in FP8, else d * 2.
With --indexer as well, DeepSeek-V3.2's lightning indexer picks those K positions instead (random index keys, one
128-dim key a token in a pool paged like the latent one, and random index queries, 64 heads of 128: its sizes), and
each row times the indexer (the keys read through the block table, the scores, the top-k) and the sparse decode
together, one attention layer's step; the indexer adds FLOPs = b s_q 64 L 2 * 128 and bytes =
b (L * 128 + s_q * 64 * 128) * 2 (L the mean length). Those are the ideal counts, each sequence's own keys read
once: the XLA path gathers and scores every position of the block table (the longest sequence's pages, up to
2 s_k) for every sequence, and writes the gathered keys out before scoring them.

Without a GPU (or without the built kernels) the decode runs the pure-JAX reference; the output says so, and
those numbers are not kernel numbers. Writes results.csv, results.json and, with matplotlib, roofline.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from . import __version__, kernels_available, why_kernels_unavailable
from .api import flash_mla_with_kvcache, get_mla_metadata
from .cache import indices_in_kvcache
from .constants import PAGE_SIZE
from .device_timing import profile_calls_ms
from .fp8_cache import FP8_TOKEN_BYTES, quantize_kv_cache
from .indexer import index_scores, select_topk
from .reference import gather_pages, visible_keys
from .scheduler import split_overhead_for

HEAD_DIM = 576
HEAD_DIM_V = 512
INDEX_HEADS, INDEX_HEAD_DIM = 64, 128  # DeepSeek-V3.2's lightning indexer (--indexer)
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
PAGE_ORDERS = ("scattered", "contiguous")


@dataclasses.dataclass(frozen=True)
class GpuPeaks:
    """Datasheet roofs of one GPU model: dense bf16 tensor-core TFLOP/s, HBM GB/s, and its L2 (a smaller KV pool
    would be timed out of cache)."""
    name: str
    tflops: float
    gbps: float
    l2_bytes: float


H100_SXM = GpuPeaks("H100 SXM", 989.0, 3350.0, 50e6)
# Vendor datasheet figures (dense bf16: half the "with sparsity" number). Matched in order against the device
# kind JAX reports ("NVIDIA H100 80GB HBM3", "NVIDIA H200", ...): the first entry whose every word appears in it
# wins, so the PCIe and NVL parts come before their SXM siblings.
KNOWN_GPUS = (
    ("H100 PCIe", GpuPeaks("H100 PCIe", 756.0, 2000.0, 50e6)),
    ("H800 PCIe", GpuPeaks("H800 PCIe", 756.0, 2000.0, 50e6)),
    ("H100 NVL", GpuPeaks("H100 NVL", 835.0, 3900.0, 50e6)),
    ("H100", H100_SXM),
    ("H800", GpuPeaks("H800 SXM", 989.0, 3350.0, 50e6)),
    ("H200 NVL", GpuPeaks("H200 NVL", 835.0, 4800.0, 60e6)),
    ("H200", GpuPeaks("H200 SXM", 989.0, 4800.0, 60e6)),
    ("H20", GpuPeaks("H20", 148.0, 4000.0, 60e6)),
)


def gpu_peaks(device_kind: str) -> GpuPeaks | None:
    """The datasheet roofs of the GPU named `device_kind`, or None for a device not in KNOWN_GPUS."""
    words = set(device_kind.upper().replace("-", " ").split())
    for pattern, peaks in KNOWN_GPUS:
        if set(pattern.upper().split()) <= words:
            return peaks
    return None


FULL_SEQLENS = (4096, 8192, 16384, 32768)
FULL_S_Q = (1, 2)
FULL_H_Q = (16, 64, 128)
QUICK_SEQLENS = (4096, 16384)
QUICK_PAIRS = ((1, 16), (2, 128))  # (s_q, h_q): one memory-bound and one compute-bound shape
MIN_REPORTED_ITERS = 50
TIMED_SCOPE = "jax_flashmla_timed_decode"  # named scope of the decode in the timing loop (device_timing)

METHOD = ("kernel_ms (baseline_ms) where kernel_timing (baseline_timing) is 'profiler': median over the "
          "n * repeats decodes of repeats profiled calls of a jitted lax.fori_loop running the decode n times, "
          "each decode's time the span of its kernels on the profiler's device timeline (split-KV kernel start "
          "to combine end); kernel_tail_ms: median from the end of a decode's split-KV kernel (by name, else its "
          "longest kernel) to the decode's end, what the combine and its launch gap add. Where it is 'wall-loop' (no "
          "per-decode device events, or spans under a tenth of loop_ms): loop_ms (baseline_loop_ms), "
          "median over repeats of (t(n) - t(1)) / (n - 1), t(k) = wall time of one call of that loop running k "
          "decodes (each iteration adds 0 * out[0,0,0,0] to q[0,0,0,0] and block_table[0,0]; out is "
          "loop-carried), ended by block_until_ready. Metadata precomputed. e2e_ms: median wall time of single "
          "jitted metadata + decode calls after warm-up. With layers > 1 the decode reads layer layers-1 of a "
          "stacked pool in place; e2e_sliced_ms times the e2e call given that layer sliced out instead.")


@dataclasses.dataclass(frozen=True)
class RowConfig:
    batch: int
    s_k: int
    s_q: int
    h_q: int
    h_kv: int
    causal: bool
    dtype: str
    sparse_topk: int | None = None  # sparse decode with this many indices a query token (--sparse-topk)
    fp8: bool = False  # with sparse_topk: the cache packed in DeepSeek-V3.2's FP8 layout
    indexer: bool = False  # with sparse_topk: a lightning indexer picks the positions, timed with the decode


# ----------------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jax_flashmla.bench",
        description="Time jax_flashmla's MLA decode on FlashMLA's benchmark grid, against a plain-XLA decode.",
    )
    g = p.add_argument_group("grid (defaults: FlashMLA's benchmark grid)")
    g.add_argument("--quick", action="store_true",
                   help=f"a few rows: s_k {QUICK_SEQLENS}, (s_q, h_q) in {QUICK_PAIRS}, causal off")
    g.add_argument("--batch", type=int, default=128, help="sequences per call (default 128)")
    g.add_argument("--seqlen", type=_int_list, default=None, help=f"mean KV lengths s_k (default {FULL_SEQLENS})")
    g.add_argument("--s-q", type=_int_list, default=None, help=f"query tokens per sequence (default {FULL_S_Q})")
    g.add_argument("--h-q", type=_int_list, default=None, help=f"query heads (default {FULL_H_Q})")
    g.add_argument("--h-kv", type=int, default=1, help="KV heads (default 1)")
    g.add_argument("--causal", choices=["off", "on", "both"], default=None,
                   help="causal masking, which matters only for s_q > 1 (default both; off with --quick)")
    g.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="q and KV dtype (default bfloat16)")
    g.add_argument("--fixed-lengths", action="store_true", help="every sequence has length s_k")
    g.add_argument("--seed", type=int, default=0, help="seed for lengths and inputs (default 0)")
    g.add_argument("--page-order", choices=PAGE_ORDERS, default="scattered",
                   help="where each sequence's pages lie in the pool: scattered by a random permutation "
                   "(default), or contiguous, in order")
    g.add_argument("--sparse-topk", type=int, default=None,
                   help="time DeepSeek-V3.2 sparse decode instead: each query token attends to this many distinct "
                   "positions of its sequence, drawn at random (-1 past a shorter sequence's end). It runs in XLA "
                   "(no CUDA kernel yet), so the rows have no plain-XLA baseline and are not kernel numbers")
    g.add_argument("--fp8", action="store_true",
                   help="with --sparse-topk: the cache in DeepSeek-V3.2's FP8 layout (656 bytes a token)")
    g.add_argument("--indexer", action="store_true",
                   help="with --sparse-topk: DeepSeek-V3.2's lightning indexer (64 heads of 128) picks the positions "
                   "from random index keys, and each row times the indexer and the sparse decode together")
    g.add_argument("--layers", type=int, default=1,
                   help="layers in the KV pool (default 1: FlashMLA's one-layer k_cache); with N > 1 the decode "
                   "reads the last layer of the stack in place, and e2e_sliced_ms times slicing it out instead")
    t = p.add_argument_group("timing and output")
    t.add_argument("--warmup", type=int, default=2,
                   help="untimed calls of each function; the first compiles (default 2)")
    t.add_argument("--iters", type=int, default=MIN_REPORTED_ITERS,
                   help=f"decodes per timed loop and timed end-to-end calls (default {MIN_REPORTED_ITERS}; "
                   f"runs with fewer are marked not reportable)")
    t.add_argument("--repeats", type=int, default=5, help="timed loops per row; the median is kept (default 5)")
    t.add_argument("--baseline-iters", type=int, default=10,
                   help="decodes per timed loop of the plain-XLA baseline (default 10: it is 10-100x slower, and "
                   "long rows would otherwise take minutes)")
    t.add_argument("--no-baseline", action="store_true", help="skip the plain-XLA baseline")
    t.add_argument("--peak-tflops", type=float, default=None,
                   help="compute roof in TFLOP/s (default: the datasheet bf16 peak of the GPU JAX sees, "
                   f"{H100_SXM.tflops:g} for an H100 SXM or an unknown device)")
    t.add_argument("--peak-gbps", type=float, default=None,
                   help="memory roof in GB/s (default: the datasheet HBM bandwidth of the GPU JAX sees, "
                   f"{H100_SXM.gbps:g} for an H100 SXM or an unknown device)")
    t.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default bench_out/)")
    args = p.parse_args(argv)

    args.seqlen = args.seqlen or list(QUICK_SEQLENS if args.quick else FULL_SEQLENS)
    if args.quick and args.s_q is None and args.h_q is None:
        args.pairs = list(QUICK_PAIRS)
    else:
        args.pairs = list(itertools.product(args.s_q or FULL_S_Q, args.h_q or FULL_H_Q))
    args.causal = args.causal or ("off" if args.quick or args.sparse_topk else "both")

    for name in ("batch", "h_kv", "warmup", "repeats", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("iters", "baseline_iters"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be >= 2 (the loop timing differences n and 1 decodes), "
                    f"got {getattr(args, name)}")
    if not args.seqlen or min(args.seqlen) < 1:
        p.error(f"--seqlen values must be >= 1, got {args.seqlen}")
    if not args.pairs or min(min(pair) for pair in args.pairs) < 1:
        p.error("--s-q and --h-q values must be >= 1")
    if max(s_q for s_q, _ in args.pairs) > 2 * min(args.seqlen):
        p.error("--s-q values must be at most 2 x the smallest --seqlen (lengths are clipped to [s_q, 2 s_k])")
    if any(h_q % args.h_kv for _, h_q in args.pairs):
        p.error(f"--h-q values must be multiples of --h-kv {args.h_kv}")
    if args.sparse_topk is not None and args.sparse_topk < 1:
        p.error(f"--sparse-topk must be >= 1, got {args.sparse_topk}")
    if args.sparse_topk and args.causal != "off":
        p.error("--causal applies to the dense decode only: sparse attention takes no causal mask")
    if args.fp8 and not args.sparse_topk:
        p.error("--fp8 needs --sparse-topk: only sparse attention reads an FP8 cache")
    if args.indexer and not args.sparse_topk:
        p.error("--indexer needs --sparse-topk: the indexer picks the positions sparse attention reads")
    if any(peak is not None and not peak > 0 for peak in (args.peak_tflops, args.peak_gbps)):
        p.error("--peak-tflops and --peak-gbps must be > 0")
    return args


def resolve_peaks(args: argparse.Namespace, device_kind: str) -> str:
    """Fills the roofs the command line left unset from the datasheet of the GPU named `device_kind` (an H100
    SXM's when it is not in KNOWN_GPUS) and sets args.l2_bytes; returns a line saying where they came from."""
    known = gpu_peaks(device_kind)
    peaks = known or H100_SXM
    from_flags = [name for name in ("peak_tflops", "peak_gbps") if getattr(args, name) is not None]
    if args.peak_tflops is None:
        args.peak_tflops = peaks.tflops
    if args.peak_gbps is None:
        args.peak_gbps = peaks.gbps
    args.l2_bytes = peaks.l2_bytes
    source = f"{peaks.name} datasheet" if known else f"not a known GPU ({device_kind}): {peaks.name} datasheet"
    if from_flags:
        source += ", except " + " and ".join("--" + name.replace("_", "-") for name in from_flags)
    return f"roofs: {args.peak_tflops:g} TFLOP/s, {args.peak_gbps:g} GB/s ({source})"


def build_grid(args: argparse.Namespace) -> list[RowConfig]:
    """Rows in FlashMLA's order; s_q = 1 runs non-causal only, since causal changes nothing there."""
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.causal]
    rows = []
    for s_k in args.seqlen:
        for s_q, h_q in args.pairs:
            for causal in (modes if s_q > 1 else (False,)):
                rows.append(RowConfig(args.batch, s_k, s_q, h_q, args.h_kv, causal, args.dtype, args.sparse_topk,
                                      args.fp8, args.indexer))
    return rows


# ----------------------------------------------------------------------------------------------------
# Problems


def sample_lengths(config: RowConfig, fixed: bool, seed: int) -> np.ndarray:
    """FlashMLA's lengths: N(s_k, s_k / 2) clipped to [s_q, 2 s_k]; seeded by s_k so rows of one s_k share them."""
    if fixed:
        return np.full(config.batch, config.s_k, np.int32)
    rng = np.random.default_rng([seed, config.s_k, config.batch])
    lengths = rng.normal(config.s_k, config.s_k / 2, config.batch)
    return np.clip(lengths, config.s_q, 2 * config.s_k).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("s_q", "h_q", "h_kv", "num_pages", "max_pages", "dtype", "layers",
                                             "scattered"))
def _random_inputs(key, pages, *, s_q, h_q, h_kv, num_pages, max_pages, dtype, layers, scattered=True):
    kq, kk, kp = jax.random.split(key, 3)
    q = (jax.random.normal(kq, (pages.shape[0], s_q, h_q, HEAD_DIM)) / 10).astype(dtype)
    pool_shape = (num_pages, PAGE_SIZE, h_kv, HEAD_DIM) if layers == 1 else (layers, num_pages, PAGE_SIZE, h_kv,
                                                                             HEAD_DIM)
    k_cache = (jax.random.normal(kk, pool_shape) / 10).astype(dtype)
    # Sequence i owns slots [first_i, first_i + pages_i) of `order`: a permutation scatters its pages over the
    # pool, an arange lays them out in order.
    order = (jax.random.permutation(kp, num_pages) if scattered else jnp.arange(num_pages)).astype(jnp.int32)
    first = jnp.cumsum(pages) - pages
    column = jnp.arange(max_pages)
    owned = jnp.take(order, first[:, None] + column, mode="clip")
    table = jnp.where(column < pages[:, None], owned, 0)  # unused entries: any valid page, never read
    return q, k_cache, table


def make_inputs(key, lengths: np.ndarray, config: RowConfig, layers: int = 1, page_order: str = "scattered"):
    """(q, k_cache, block_table, cache_seqlens) on the device; the pool holds exactly the pages in use, in
    each of `layers` layers (a rank-5 stacked pool when layers > 1), in `page_order` (PAGE_ORDERS)."""
    pages = -(-lengths // PAGE_SIZE)
    q, k_cache, table = _random_inputs(key, jnp.asarray(pages, jnp.int32), s_q=config.s_q, h_q=config.h_q,
                                       h_kv=config.h_kv, num_pages=int(pages.sum()), max_pages=int(pages.max()),
                                       dtype=DTYPES[config.dtype], layers=layers,
                                       scattered=page_order == "scattered")
    return q, k_cache, table, jnp.asarray(lengths, jnp.int32)


@functools.partial(jax.jit, static_argnames=("s_q", "topk", "num_pages"))
def sparse_indices(key, block_table, cache_seqlens, *, s_q: int, topk: int, num_pages: int):
    """(b, s_q, topk) int32 indices of sparse decode (page * 64 + slot) into a pool of num_pages: for each query
    token, topk distinct positions of its sequence drawn at random, as an indexer's top-k picks would be, through
    the block table; -1 past the end of a sequence shorter than topk."""
    batch, max_pages = block_table.shape
    num_tokens = max_pages * PAGE_SIZE
    scores = jax.random.uniform(key, (batch, s_q, num_tokens))
    scores = jnp.where(jnp.arange(num_tokens) < cache_seqlens[:, None, None], scores, -1.0)
    scores, positions = jax.lax.top_k(scores, min(topk, num_tokens))
    indices = indices_in_kvcache(block_table, jnp.where(scores >= 0, positions, -1), num_pages)
    return jnp.pad(indices, ((0, 0), (0, 0), (0, topk - indices.shape[-1])), constant_values=-1)


def xla_baseline_decode(q, k_cache, block_table, cache_seqlens, *, head_dim_v: int, causal: bool,
                        softmax_scale: float | None = None):
    """MLA decode as a JAX user would write it without a kernel: gather every sequence's pages padded to the
    longest, einsum in the input dtype (f32 scores), f32 softmax. Assumes every query sees at least one key.

    Returns out (b, s_q, h_q, head_dim_v) in q's dtype and lse (b, h_q, s_q) float32.
    """
    batch, s_q, h_q, head_dim = q.shape
    h_kv = k_cache.shape[2]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    keys = k_cache[block_table].reshape(batch, -1, h_kv, head_dim)  # (b, T, h_kv, d)
    queries = q.reshape(batch, s_q, h_kv, h_q // h_kv, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", queries, keys, preferred_element_type=jnp.float32) * scale
    mask = visible_keys(cache_seqlens, s_q, keys.shape[1], causal)  # (b, s_q, T)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - lse).astype(q.dtype)
    out = jnp.einsum("bkgst,btkv->bskgv", probs, keys[..., :head_dim_v], preferred_element_type=jnp.float32)
    return out.reshape(batch, s_q, h_q, head_dim_v).astype(q.dtype), lse[..., 0].reshape(batch, h_q, s_q)


# ----------------------------------------------------------------------------------------------------
# Timing


def repeat_decode(step, n: int):
    """jit of (q, k_cache, table, *rest) -> (q, table, out) running `out, _ = step(q, k_cache, table, *rest)`
    n times in a fori_loop.

    Each iteration adds z = 0 * out[0,0,0,0] to q[0,0,0,0] and table[0,0], as one layer's decode feeds the
    next: the next call depends on this one, so XLA can neither deduplicate it nor hoist loop-invariant work
    such as the baseline's page gather out of the loop (x * 0 is not folded for floats, because of NaN).
    `out` is carried so that all of it is live every iteration. The step runs under
    jax.named_scope(TIMED_SCOPE), which is how the profiler's device events are attributed to it.
    """

    def run(q, k_cache, table, *rest):
        out_shape = jax.eval_shape(step, q, k_cache, table, *rest)[0]

        def body(_, carry):
            q, table, _ = carry
            with jax.named_scope(TIMED_SCOPE):
                out, _ = step(q, k_cache, table, *rest)
            zero = 0 * out[0, 0, 0, 0]
            return q.at[0, 0, 0, 0].add(zero.astype(q.dtype)), table.at[0, 0].add(zero.astype(table.dtype)), out

        return jax.lax.fori_loop(0, n, body, (q, table, jnp.zeros(out_shape.shape, out_shape.dtype)))

    return jax.jit(run)


def _seconds(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def loop_ms(many, one, args, iters: int, repeats: int, warmup: int) -> float:
    """Per-decode ms from the loops `many` (iters decodes) and `one` (1 decode): median of the differences."""
    for _ in range(warmup):  # the first call compiles
        _seconds(many, args)
        _seconds(one, args)
    diffs = [(_seconds(many, args) - _seconds(one, args)) / (iters - 1) for _ in range(repeats)]
    return 1e3 * statistics.median(diffs)


# A profiled decode shorter than this fraction of the loop's time per decode has lost kernels to attribution.
MISSED_WORK_RATIO = 0.1


def decode_ms(step, one, args, iters: int, repeats: int, warmup: int) -> tuple[float, float, str, float | None]:
    """(ms per decode, loop_ms, timing, tail ms) of `step` on `args`, `one` its repeat_decode(step, 1): the
    profiler's device time of each decode (timing "profiler") where there is a device timeline and it holds at
    least MISSED_WORK_RATIO of loop_ms, else loop_ms (timing "wall-loop"). The tail (device_timing; None without
    the profiler) is the median time from the end of a decode's split-KV kernel to the decode's end."""
    many = repeat_decode(step, iters).lower(*args).compile()
    wall = loop_ms(many, one, args, iters, repeats, warmup)
    calls = profile_calls_ms(many, args, TIMED_SCOPE, iters, repeats)
    if calls is None:
        return wall, wall, "wall-loop", None
    span = statistics.median(span for span, _ in calls)
    if span < MISSED_WORK_RATIO * wall:
        # The spans hold a small part of the work: kernels of the step were not attributed to its scope (on an
        # H200 the sparse XLA decode's runs came out 23-290x shorter than the loop), so they are not its time.
        return wall, wall, "wall-loop", None
    return span, wall, "profiler", statistics.median(t for _, t in calls)


def call_ms(fn, args, iters: int, warmup: int) -> float:
    """Median wall ms of single calls, dispatch included."""
    for _ in range(warmup):
        _seconds(fn, args)
    return 1e3 * statistics.median(_seconds(fn, args) for _ in range(iters))


def _out_of_memory(err: Exception) -> bool:
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


# ----------------------------------------------------------------------------------------------------
# Metrics


def flops_and_bytes(batch, s_q, h_q, h_kv, mean_len, head_dim=HEAD_DIM, head_dim_v=HEAD_DIM_V, itemsize=2):
    """FlashMLA's counts: QK^T and PV FLOPs over the mean length; bytes of q, the KV once, and out."""
    flops = batch * h_q * s_q * (2 * head_dim * mean_len + 2 * head_dim_v * mean_len)
    nbytes = batch * (s_q * h_q * head_dim + mean_len * h_kv * head_dim + s_q * h_q * head_dim_v) * itemsize
    return flops, nbytes


def sparse_flops_and_bytes(batch, s_q, h_q, topk, token_bytes, head_dim=HEAD_DIM, head_dim_v=HEAD_DIM_V,
                           itemsize=2):
    """Sparse decode's counts: every query token reads its own topk tokens (token_bytes each: 656 in FP8, else
    576 * itemsize), the heads sharing them; q and out as in the dense count."""
    flops = batch * s_q * h_q * topk * (2 * head_dim + 2 * head_dim_v)
    nbytes = batch * s_q * (h_q * (head_dim + head_dim_v) * itemsize + topk * token_bytes)
    return flops, nbytes


def indexer_flops_and_bytes(batch, s_q, mean_len, heads=INDEX_HEADS, head_dim=INDEX_HEAD_DIM, itemsize=2):
    """The lightning indexer's counts: each query token's heads score every key of its sequence (one head_dim key a
    token, read once per sequence), relu and the weighted sum over heads not counted."""
    flops = batch * s_q * heads * mean_len * 2 * head_dim
    nbytes = batch * (mean_len * head_dim + s_q * heads * head_dim) * itemsize
    return flops, nbytes


def roofline_pct(flops, nbytes, ms, peak_tflops, peak_gbps):
    """Time floor over measured time, in %: 100 means the call ran at the roof."""
    floor_s = max(flops / (peak_tflops * 1e12), nbytes / (peak_gbps * 1e9))
    return _per_second(100 * floor_s, ms)


def _per_second(amount, ms):
    """amount / seconds, or None where there is no usable time (skipped, or noise made it <= 0)."""
    return None if ms is None or ms <= 0 else amount / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------------
# One row


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "kernels_available": kernels_available(),
        "kernels_used": device.platform == "gpu" and kernels_available(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "jax_flashmla_version": __version__,
        # The Hopper kernel picked by hand (seesaw, hopper: src/kernels/decode_launch.cuh); None is the default.
        "decode_kernel_env": os.environ.get("JAX_FLASHMLA_DECODE_KERNEL"),
        # JAX_FLASHMLA_COMBINE=separate: the combine kernel launched after the decode. Unset is the default: as the
        # decode's programmatic dependent from commit 967ed70 on (benchmarks/h100.json of 2026-12-05 was timed so),
        # after the decode before it.
        "combine_env": os.environ.get("JAX_FLASHMLA_COMBINE"),
        # JAX_FLASHMLA_COMBINE_SLICES=2 or 4: warps per query row in the combine, forced; None: by the schedule's
        # shape (src/kernels/combine.cu, from 2026-12-06's version 2.26 on; one warp a row before).
        "combine_slices_env": os.environ.get("JAX_FLASHMLA_COMBINE_SLICES"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": METHOD,
    }


def bench_row(config: RowConfig, args: argparse.Namespace, key) -> dict:
    lengths = sample_lengths(config, args.fixed_lengths, args.seed)
    q, k_cache, table, seqlens = make_inputs(key, lengths, config, args.layers, args.page_order)
    layer = None if args.layers == 1 else args.layers - 1  # the stack's last layer: the largest pointer offset
    if config.sparse_topk and config.fp8:
        k_cache = jax.jit(quantize_kv_cache)(k_cache)
    if config.sparse_topk and config.indexer:
        index_inputs = _index_inputs(jax.random.fold_in(key, 1), batch=table.shape[0], s_q=config.s_q,
                                     num_pages=k_cache.shape[-4], dtype=DTYPES[config.dtype])
        decode = functools.partial(_indexed_sparse_decode, topk=config.sparse_topk, fp8=config.fp8, layer=layer)
        timed_args = e2e_args = (q, k_cache, table, seqlens, *index_inputs)
        e2e = jax.jit(decode)
        sliced = jax.jit(lambda q, pools, *rest: _indexed_sparse_decode(q, pools[layer], *rest, topk=config.sparse_topk,
                                                                        fp8=config.fp8))
    elif config.sparse_topk:
        indices = sparse_indices(jax.random.fold_in(key, 1), table, seqlens, s_q=config.s_q, topk=config.sparse_topk,
                                 num_pages=k_cache.shape[-4])
        decode = functools.partial(_sparse_decode, fp8=config.fp8, layer=layer)
        timed_args = e2e_args = (q, k_cache, indices)
        e2e = jax.jit(decode)
        sliced = jax.jit(lambda q, pools, indices: _sparse_decode(q, pools[layer], indices, fp8=config.fp8))
    else:
        q_rows = config.s_q * config.h_q // config.h_kv
        metadata = jax.block_until_ready(get_mla_metadata(seqlens, q_rows, config.h_kv))
        decode = functools.partial(_decode_with_metadata, causal=config.causal, layer=layer)
        timed_args, e2e_args = (q, k_cache, table, seqlens, *metadata), (q, k_cache, table, seqlens)
        e2e = jax.jit(functools.partial(_decode_end_to_end, causal=config.causal, layer=layer))
        sliced = jax.jit(lambda q, pools, table, seqlens: _decode_end_to_end(q, pools[layer], table, seqlens,
                                                                             causal=config.causal))

    kernel_one = repeat_decode(decode, 1)
    kernel_ms, kernel_loop_ms, kernel_timing, kernel_tail_ms = decode_ms(decode, kernel_one, timed_args, args.iters,
                                                                         args.repeats, args.warmup)
    e2e_ms = call_ms(e2e, e2e_args, args.iters, args.warmup)
    e2e_sliced_ms = None if layer is None else call_ms(sliced, e2e_args, args.iters, args.warmup)

    baseline_ms = baseline_loop_ms = baseline_timing = diff = None
    note = "skipped (--no-baseline)" if args.no_baseline else ""
    if config.sparse_topk:
        note = "none: the sparse decode itself runs in XLA"
    elif not args.no_baseline:
        baseline = functools.partial(_baseline_decode, causal=config.causal, layer=layer)
        baseline_one = repeat_decode(baseline, 1)
        args_b = (q, k_cache, table, seqlens)
        try:
            baseline_ms, baseline_loop_ms, baseline_timing, _ = decode_ms(baseline, baseline_one, args_b,
                                                                          args.baseline_iters, args.repeats,
                                                                          args.warmup)
            # The two decodes must agree, or the comparison times something wrong.
            ours, theirs = kernel_one(*timed_args)[-1], baseline_one(*args_b)[-1]
            diff = float(jnp.max(jnp.abs(ours.astype(jnp.float32) - theirs.astype(jnp.float32))))
        except jax.errors.JaxRuntimeError as err:
            if not _out_of_memory(err):
                raise
            note = "out of memory"

    itemsize = np.dtype(DTYPES[config.dtype]).itemsize
    mean_len = float(lengths.mean())
    if config.sparse_topk:
        token_bytes = FP8_TOKEN_BYTES if config.fp8 else HEAD_DIM * itemsize
        flops, nbytes = sparse_flops_and_bytes(config.batch, config.s_q, config.h_q, config.sparse_topk, token_bytes,
                                               itemsize=itemsize)
        if config.indexer:
            flops, nbytes = (a + b for a, b in zip((flops, nbytes), indexer_flops_and_bytes(
                config.batch, config.s_q, mean_len, itemsize=itemsize)))
    else:
        flops, nbytes = flops_and_bytes(config.batch, config.s_q, config.h_q, config.h_kv, mean_len,
                                        itemsize=itemsize)
    tflops, baseline_tflops = (_per_second(flops / 1e12, ms) for ms in (kernel_ms, baseline_ms))
    return {
        **dataclasses.asdict(config),
        **({"kernels_used": False} if config.sparse_topk else {}),  # XLA, whatever the GPU
        "head_dim": HEAD_DIM, "head_dim_v": HEAD_DIM_V, "page_size": PAGE_SIZE,
        "fixed_lengths": args.fixed_lengths, "seed": args.seed, "page_order": args.page_order,
        # Blocks the schedule charged per split (scheduler.split_overhead_for; 5 for every row before 2026-12-06).
        "split_overhead": None if config.sparse_topk else split_overhead_for(config.s_q * config.h_q // config.h_kv),
        "mean_len": mean_len, "min_len": int(lengths.min()), "max_len": int(lengths.max()),
        "layers": args.layers, "kv_cache_mb": k_cache.nbytes / args.layers / 1e6,  # the layer read
        "iters": args.iters, "repeats": args.repeats, "warmup": args.warmup, "baseline_iters": args.baseline_iters,
        "reportable": args.iters >= MIN_REPORTED_ITERS,
        "kernel_ms": kernel_ms, "kernel_timing": kernel_timing, "kernel_tail_ms": kernel_tail_ms,
        "loop_ms": kernel_loop_ms,
        "e2e_ms": e2e_ms, "e2e_sliced_ms": e2e_sliced_ms,
        "flops": flops, "bytes": nbytes, "arithmetic_intensity": flops / nbytes,
        "tflops": tflops, "gbps": _per_second(nbytes / 1e9, kernel_ms),
        "roofline_pct": roofline_pct(flops, nbytes, kernel_ms, args.peak_tflops, args.peak_gbps),
        "peak_tflops": args.peak_tflops, "peak_gbps": args.peak_gbps,
        "baseline_ms": baseline_ms, "baseline_timing": baseline_timing, "baseline_loop_ms": baseline_loop_ms,
        "baseline_tflops": baseline_tflops,
        "speedup": None if baseline_ms is None or kernel_ms <= 0 else baseline_ms / kernel_ms,
        "baseline_max_abs_diff": diff, "baseline_note": note,
    }  # fmt: skip


@functools.partial(jax.jit, static_argnames=("batch", "s_q", "num_pages", "dtype"))
def _index_inputs(key, *, batch, s_q, num_pages, dtype):
    """Random indexer queries (b, s_q, 64, 128), head weights (b, s_q, 64) float32 and a key pool (num_pages, 64, 128)
    paged like the latent pool: DeepSeek-V3.2's indexer sizes."""
    kq, kw, kk = jax.random.split(key, 3)
    index_q = (jax.random.normal(kq, (batch, s_q, INDEX_HEADS, INDEX_HEAD_DIM)) / 10).astype(dtype)
    weights = jax.random.normal(kw, (batch, s_q, INDEX_HEADS), jnp.float32) * INDEX_HEADS**-0.5
    index_pool = (jax.random.normal(kk, (num_pages, PAGE_SIZE, INDEX_HEAD_DIM)) / 10).astype(dtype)
    return index_q, weights, index_pool


def indexer_picks(table, seqlens, index_q, index_weights, index_pool, *, topk):
    """The indexer's top-k positions (b, s_q, topk) over every key each query may see: the queries are each
    sequence's last s_q tokens (as the causal decode aligns them), the keys those on valid pages at or before the
    query's position; -1 past them."""
    keys, on_valid_page = gather_pages(index_pool, table)  # (b, T, 128), (b, T)
    visible = visible_keys(seqlens, index_q.shape[1], keys.shape[1], causal=True) & on_valid_page[:, None, :]
    return select_topk(index_scores(index_q, index_weights, keys, visible), topk)


def _indexed_sparse_decode(q, k_cache, table, seqlens, index_q, index_weights, index_pool, *, topk, fp8, layer=None):
    """One V3.2 attention step: the indexer's picks, then the sparse decode reads those."""
    positions = indexer_picks(table, seqlens, index_q, index_weights, index_pool, topk=topk)
    return _sparse_decode(q, k_cache, indices_in_kvcache(table, positions, k_cache.shape[-4]), fp8=fp8, layer=layer)


def _sparse_decode(q, k_cache, indices, *, fp8, layer=None):
    return flash_mla_with_kvcache(q, k_cache, None, None, HEAD_DIM_V, is_fp8_kvcache=fp8, indices=indices,
                                  layer=layer)


def _decode_with_metadata(q, k_cache, table, seqlens, tile_metadata, num_splits, *, causal, layer):
    return flash_mla_with_kvcache(q, k_cache, table, seqlens, HEAD_DIM_V, tile_metadata, num_splits, causal=causal,
                                  layer=layer)


def _decode_end_to_end(q, k_cache, table, seqlens, *, causal, layer=None):
    # Without metadata, flash_mla_with_kvcache computes it inside the call, as a one-off caller would.
    return flash_mla_with_kvcache(q, k_cache, table, seqlens, HEAD_DIM_V, causal=causal, layer=layer)


def _baseline_decode(q, k_cache, table, seqlens, *, causal, layer):
    pool = k_cache if layer is None else k_cache[layer]
    return xla_baseline_decode(q, pool, table, seqlens, head_dim_v=HEAD_DIM_V, causal=causal)


# ----------------------------------------------------------------------------------------------------
# Output


class Progress:
    """tqdm over the rows when installed, else one line per finished row."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm  # optional dependency
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="bench", unit="row")

    def update(self, record: dict):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{_config_label(record)}: {_fmt(record['kernel_ms'], '.3f')} ms")
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {_config_label(record)}: kernel {_fmt(record['kernel_ms'], '.3f')} ms, "
                  f"baseline {_fmt(record['baseline_ms'], '.3f')} ms", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _config_label(r: dict) -> str:
    label = f"b={r['batch']} s_k={r['s_k']} s_q={r['s_q']} h_q={r['h_q']} h_kv={r['h_kv']} causal={int(r['causal'])}"
    if r["sparse_topk"]:
        label += f" sparse topk={r['sparse_topk']}{' fp8' if r['fp8'] else ''}{' indexer' if r['indexer'] else ''}"
    return label


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_COLUMNS = [  # (header, record key, format)
    ("b", "batch", "d"), ("s_k", "s_k", "d"), ("s_q", "s_q", "d"), ("h_q", "h_q", "d"), ("h_kv", "h_kv", "d"),
    ("causal", "causal", "d"), ("topk", "sparse_topk", "d"), ("fp8", "fp8", "d"), ("indexer", "indexer", "d"),
    ("kernel ms", "kernel_ms", ".4f"),
    ("loop ms", "loop_ms", ".4f"),
    ("e2e ms", "e2e_ms", ".4f"),
    ("sliced e2e ms", "e2e_sliced_ms", ".4f"),
    ("TFLOPS", "tflops", ".3g"), ("GB/s", "gbps", ".1f"), ("% roof", "roofline_pct", ".3g"),
    ("base ms", "baseline_ms", ".4f"), ("speedup", "speedup", ".2f"),
]  # fmt: skip


# Shown only where some row has a value: the sliced call's time (--layers > 1), the sparse rows' settings.
OPTIONAL_COLUMNS = {"e2e_sliced_ms", "sparse_topk", "fp8", "indexer"}


def format_table(records: list[dict]) -> str:
    columns = [c for c in TABLE_COLUMNS if c[1] not in OPTIONAL_COLUMNS or any(r[c[1]] for r in records)]
    cells = [[h for h, _, _ in columns]]
    cells += [[_fmt(r[key], spec) for _, key, spec in columns] for r in records]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_results(records: list[dict], out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def plot_roofline(records: list[dict], path: Path) -> bool:
    """Arithmetic intensity vs achieved TFLOPS under the roofline; False when matplotlib is missing."""
    try:
        # Optional dependency; a bare Figure needs no pyplot state and no GUI backend.
        from matplotlib.figure import Figure
    except ImportError:
        return False
    peak_tflops, peak_gbps = records[0]["peak_tflops"], records[0]["peak_gbps"]
    ridge = peak_tflops * 1e3 / peak_gbps  # FLOP/byte where the two roofs meet
    intensity = np.array([r["arithmetic_intensity"] for r in records])
    x = np.geomspace(min(intensity.min(), ridge) / 4, max(intensity.max(), ridge) * 4, 256)

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    ax.plot(x, np.minimum(peak_tflops, x * peak_gbps / 1e3), "k-", lw=1.5,
            label=f"roofline ({peak_gbps:g} GB/s, {peak_tflops:g} TFLOP/s)")
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    ours = ("jax_flashmla indexer + sparse decode (XLA)" if records[0]["indexer"] else
            "jax_flashmla sparse decode (XLA)" if records[0]["sparse_topk"] else
            "jax_flashmla" if records[0]["kernels_used"] else "jax_flashmla (pure-JAX reference)")
    for key, marker, label in (("tflops", "o", ours), ("baseline_tflops", "x", "plain XLA")):
        points = [(r["arithmetic_intensity"], r[key]) for r in records if r[key] is not None and r[key] > 0]
        if points:
            ax.scatter(*zip(*points), marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"MLA decode on {records[0]['device_kind']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def backend_note(env: dict, sparse: bool = False) -> str:
    if sparse:
        return (f"NOTE: sparse decode runs in XLA on {env['platform']} (no CUDA kernel yet). These are NOT kernel "
                "numbers.")
    if env["kernels_used"]:
        return f"decode: jax_flashmla CUDA kernels on {env['device_kind']}"
    why = why_kernels_unavailable() if env["platform"] == "gpu" else f"no GPU, platform {env['platform']}"
    return (f"NOTE: ran the pure-JAX reference on {env['platform']} ({why}). "
            "These are NOT kernel numbers.")


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    rows = build_grid(args)
    peaks_note = resolve_peaks(args, env["device_kind"])
    sparse = bool(args.sparse_topk)
    print(f"jax {env['jax_version']}, jax_flashmla {env['jax_flashmla_version']}; {backend_note(env, sparse)}")
    if env["decode_kernel_env"]:
        print(f"JAX_FLASHMLA_DECODE_KERNEL={env['decode_kernel_env']}: that kernel where it applies")
    if env["combine_env"]:
        print(f"JAX_FLASHMLA_COMBINE={env['combine_env']}: how the splits are merged")
    if env["combine_slices_env"]:
        print(f"JAX_FLASHMLA_COMBINE_SLICES={env['combine_slices_env']}: warps per query row in the combine")
    print(peaks_note)
    print(f"{len(rows)} rows, {args.dtype}, {args.iters} iters x {args.repeats} repeats, warm-up {args.warmup}")
    if args.iters < MIN_REPORTED_ITERS:
        print(f"NOTE: --iters {args.iters} < {MIN_REPORTED_ITERS}: records are marked reportable=false")

    root_key = jax.random.key(args.seed)
    records, progress = [], Progress(len(rows))
    try:
        for i, config in enumerate(rows):
            record = {**env, **bench_row(config, args, jax.random.fold_in(root_key, i))}
            records.append(record)
            progress.update(record)
    finally:
        progress.close()

    print(format_table(records))
    for r in records:
        if r["baseline_note"] == "out of memory":
            print(f"NOTE: {_config_label(r)}: the plain-XLA baseline ran out of memory (baseline_ms null)")
        if env["kernels_used"] and r["kernel_timing"] == "wall-loop":
            print(f"NOTE: {_config_label(r)}: the profiler did not time each decode (no events per decode, or "
                  f"spans under {MISSED_WORK_RATIO:g} of the loop's time); kernel_ms is loop_ms")
    small = [r for r in records if r["kv_cache_mb"] * 1e6 < 2 * args.l2_bytes]
    if env["platform"] == "gpu" and small:
        print(f"NOTE: {len(small)} rows have a KV pool under 2x the {args.l2_bytes / 1e6:g} MB L2; their times may "
              "be cache-resident")
    write_results(records, args.out)
    written = ["results.csv", "results.json"]
    if plot_roofline(records, args.out / "roofline.png"):
        written.append("roofline.png")
    else:
        print("roofline.png skipped: matplotlib is not installed")
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    if sparse or not env["kernels_used"]:
        print(backend_note(env, sparse))
    return 0


if __name__ == "__main__":
    sys.exit(main())
