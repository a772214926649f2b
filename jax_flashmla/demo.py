"""`python -m jax_flashmla.demo`: generate with a tiny random DeepSeek-style model over the paged MLA cache.

Builds the model on whatever JAX platform is present, prefills a batch of prompts of different lengths,
decodes token by token through flash_mla_with_kvcache (CUDA kernels on a GPU that has them, the pure-JAX
reference elsewhere), reports speed, then recomputes every generated token's logits from scratch without a
cache and compares. Exit status 1 if they differ by more than the tolerance, 2 for bad flags.

--mesh data=2,model=1 runs the same generation under JAX SPMD on a mesh of that shape (the first devices):
the batch and the paged cache split over "data" (the batch must divide evenly), the weights replicated, and
each FlashMLA call's heads split over "model" (jax_flashmla/model.py, mla_module.py). On a CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=4 gives four devices to try it on.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import kernels_available
from .mla_module import BATCH_AXIS, HEAD_AXIS, mesh_axis_size
from .model import DecoderConfig, build_model, check_pool_holds, generate, recompute_logits
from .sharding import mesh_from_flag

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# max |cached - recomputed| allowed, relative to max(1, max |logit|). The two paths differ in formulation
# (absorbed latent attention vs up-projected keys/values), so they agree to rounding, not bit for bit.
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jax_flashmla.demo",
        description="Generate with a tiny random DeepSeek-style MLA model over a paged KV cache, time it, "
        "and check the cached logits against a full recompute.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    m.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    m.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    m.add_argument("--intermediate", type=int, default=512, help="MLP size (default 512)")
    m.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    m.add_argument("--q-lora-rank", type=int, default=128, help="q LoRA rank, 0 for a full q projection (default 128)")
    m.add_argument(
        "--index-topk", type=int, default=0,
        help="DeepSeek-V3.2's sparse attention: a lightning indexer picks this many tokens per query (default 0: "
        "dense attention, DeepSeek-V3); needs --q-lora-rank > 0",
    )
    m.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--batch", type=int, default=4, help="number of prompts (default 4)")
    r.add_argument("--min-prompt-len", type=int, default=5, help="shortest prompt (default 5)")
    r.add_argument("--max-prompt-len", type=int, default=100, help="longest prompt (default 100)")
    r.add_argument(
        "--prompt-lengths", type=str, default=None, help="explicit comma-separated prompt lengths (sets the batch)"
    )
    r.add_argument("--steps", type=int, default=32, help="new tokens per prompt (default 32)")
    r.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="activations and KV cache; auto = bfloat16 on GPU (the kernels' dtype), float32 elsewhere",
    )
    r.add_argument("--top-k", type=int, default=1, help="1 = greedy (default), k > 1 samples from the top k")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --top-k > 1")
    r.add_argument(
        "--num-pages",
        type=int,
        default=0,
        help="hand out cache pages on demand from a pool of this many 64-token pages (default 0: each sequence "
        "reserves its whole length up front)",
    )
    r.add_argument("--tol", type=float, default=None, help="override the recompute tolerance (relative)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--mesh",
        type=str,
        default=None,
        help=f"run on a device mesh, e.g. {BATCH_AXIS}=2,{HEAD_AXIS}=1: batch over {BATCH_AXIS!r}, attention heads "
        f"over {HEAD_AXIS!r} (default: one device, no sharding)",
    )
    args = p.parse_args(argv)

    if args.prompt_lengths:
        try:
            args.lengths = [int(x) for x in args.prompt_lengths.split(",")]
        except ValueError:
            p.error(f"--prompt-lengths must be comma-separated integers, got {args.prompt_lengths!r}")
    else:
        if args.batch < 1:
            p.error(f"--batch must be >= 1, got {args.batch}")
        if not 1 <= args.min_prompt_len <= args.max_prompt_len:
            p.error(f"need 1 <= --min-prompt-len <= --max-prompt-len, got {args.min_prompt_len}, {args.max_prompt_len}")
        args.lengths = np.linspace(args.min_prompt_len, args.max_prompt_len, args.batch).round().astype(int).tolist()
    if min(args.lengths) < 1:
        p.error(f"prompt lengths must be >= 1, got {args.lengths}")
    for name in ("layers", "hidden", "heads", "intermediate", "vocab", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.q_lora_rank < 0:
        p.error(f"--q-lora-rank must be >= 0, got {args.q_lora_rank}")
    if args.index_topk < 0 or (args.index_topk and not args.q_lora_rank):
        p.error(f"--index-topk must be >= 0 and needs --q-lora-rank > 0, got {args.index_topk} and "
                f"{args.q_lora_rank}")
    if args.num_pages < 0:
        p.error(f"--num-pages must be >= 0, got {args.num_pages}")
    if not 1 <= args.top_k <= args.vocab:
        p.error(f"--top-k must be in [1, --vocab={args.vocab}], got {args.top_k}")
    if not args.temperature > 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    args.device_mesh = None
    if args.mesh is not None:
        try:
            args.device_mesh = mesh_from_flag(args.mesh)
        except ValueError as e:
            p.error(f"--mesh: {e}")
        data, model = mesh_axis_size(args.device_mesh, BATCH_AXIS), mesh_axis_size(args.device_mesh, HEAD_AXIS)
        if len(args.lengths) % data:
            p.error(f"--mesh: the batch ({len(args.lengths)}) must divide evenly over {BATCH_AXIS}={data}")
        if args.heads % model:
            p.error(f"--mesh: --heads ({args.heads}) must divide evenly over {HEAD_AXIS}={model}")
    return args


class Progress:
    """tqdm when installed, else a line every ~10%."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="generating", unit="tok", leave=False)

    def __call__(self, done: int, total: int):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif done == total or done % max(total // 10, 1) == 0:
            print(f"  generated {done}/{total} tokens per sequence", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    config = DecoderConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        q_lora_rank=args.q_lora_rank or None,
        dtype=dtype,
        index_topk=args.index_topk or None,
    )
    device = jax.devices()[0]
    backend = "CUDA kernels" if (device.platform == "gpu" and kernels_available()) else "pure-JAX reference"
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}); attention: {backend}")
    mesh = args.device_mesh
    if mesh is not None:  # without --mesh the output is as it always was
        axes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
        print(
            f"mesh: {axes} over {mesh.devices.size} of {len(jax.devices())} {device.platform} devices; batch split "
            f"{mesh_axis_size(mesh, BATCH_AXIS)} ways, heads {mesh_axis_size(mesh, HEAD_AXIS)} ways"
        )

    start = time.perf_counter()
    model = build_model(config, seed=args.seed, mesh=mesh)
    params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    print(
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads, "
        f"q_lora_rank {config.q_lora_rank}, kv_lora_rank {config.kv_lora_rank}, vocab {config.vocab_size}, "
        f"{params / 1e6:.2f}M params, {args.dtype} (built in {time.perf_counter() - start:.1f} s)"
    )
    if config.index_topk:
        print(f"sparse attention (DeepSeek-V3.2): a lightning indexer ({config.index_n_heads} heads of "
              f"{config.index_head_dim}) picks {config.index_topk} tokens per query; decode runs in XLA")

    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in args.lengths]
    sampling = "greedy" if args.top_k == 1 else f"top-{args.top_k} at temperature {args.temperature}"
    print(f"batch {len(prompts)}, prompt lengths {args.lengths}, {args.steps} new tokens each, {sampling}")

    if args.num_pages:
        shards = 1 if mesh is None else mesh_axis_size(mesh, BATCH_AXIS)
        try:
            check_pool_holds(args.num_pages, shards, np.array(args.lengths) + args.steps - 1)
        except ValueError as e:
            print(f"--num-pages: {e}", file=sys.stderr)
            return 2
    progress = Progress(args.steps, enabled=not args.no_progress)
    try:
        result = generate(
            model,
            prompts,
            args.steps,
            top_k=None if args.top_k == 1 else args.top_k,
            temperature=args.temperature,
            seed=args.seed,
            num_pages=args.num_pages or None,
            on_step=progress,
        )
    finally:
        progress.close()
    if args.num_pages:
        table = np.asarray(result.cache.block_table)
        print(f"cache: pages on demand, {int((table >= 0).sum())} of a pool of {args.num_pages} in use; a static "
              f"reservation would hold {table.size}")

    print(f"prefill: {_ms(result.prefill_seconds)} (includes compilation)")
    if result.step_seconds:
        print(f"first decode step: {_ms(result.step_seconds[0])} (includes compilation)")
    steady = np.array(result.steady_step_seconds)
    if steady.size:
        print(
            f"decode step latency over {steady.size} steps: mean {_ms(steady.mean())}, "
            f"p50 {_ms(np.percentile(steady, 50))}, p90 {_ms(np.percentile(steady, 90))}"
        )
        print(f"decode throughput: {result.decode_tokens_per_second():.1f} tokens/s (batch {len(prompts)})")
    else:
        print("decode: fewer than 2 decode steps, no steady-state timing (use --steps >= 3)")
    shown = result.tokens[0, :16].tolist()
    print(f"sequence 0 continues with: {shown}{' ...' if result.tokens.shape[1] > 16 else ''}")

    reference = recompute_logits(model, prompts, result.tokens)
    diff = float(np.max(np.abs(reference - result.logits)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    tol = DEFAULT_TOL[args.dtype] if args.tol is None else args.tol
    ok = bool(np.isfinite(diff)) and diff <= tol * scale
    print(
        f"paged-cache logits vs full recompute without cache: max |diff| = {diff:.3e} "
        f"(max |logit| {scale:.3g}, allowed {tol:g} x that) -> {'OK' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
