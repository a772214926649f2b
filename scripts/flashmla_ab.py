"""jax_flashmla's decode against FlashMLA's SM90 dense decode: same GPU, same inputs, alternating blocks of calls.

Usage (on a Hopper GPU with PyTorch, after jax_flashmla is built):
    python3 scripts/flashmla_ab.py FLASHMLA_DIR [--seqlen 4096,16384] [--pairs 1x16,2x128] [--iters 50] [--rounds 3]
                                   [--out DIR] [--profile-launches N]
  FLASHMLA_DIR  a checkout of github.com/deepseek-ai/FlashMLA (its csrc/ is enough; the layout of commit 9241ae3,
                2025-2026). Its SM90 dense decode, combine and scheduler kernels are compiled with
                torch.utils.cpp_extension (flags of its setup.py, SM90 only, bf16 only) against the CUTLASS
                headers of the nvidia-cutlass wheel, with a three-line binding of its `dense_attn_decode_interface`;
                the first run compiles for about 2 minutes, later runs reuse --build-dir. Its setup.py passes
                ptxas --register-usage-level=10, and so does this script unless --register-usage-level says
                otherwise; before 2026-12-05 it passed nothing (ptxas's default, 5), so the FlashMLA figures
                of earlier runs are of such a build (the level changes its SASS: 7,488 instructions at 5, 7,544
                at 10, 240 registers both).

Each row of the bench's grid (b 128, FlashMLA's lengths, bf16) is drawn once by jax_flashmla.bench and handed to
FlashMLA through DLPack, so both decode the same q, pool, block table and lengths; their outputs are compared.
Then, --rounds times: jax_flashmla's timing loop of --iters decodes under the profiler (the bench's kernel_ms,
split-KV start to combine end on the device timeline), then --iters back-to-back FlashMLA calls, each between
two CUDA events (its split-KV kernel and combine). Alternating blocks gives both the same clocks and temperature
as far as possible; the SM clock and board power after each block are printed (NVML).
Both medians are rates by FlashMLA's formulas. Writes DIR/flashmla_ab.json.

With --profile-launches N nothing is timed and no JSON is written: after the comparison (one decode each) each
side decodes each row N more times, for a profiler wrapped around the script, e.g. the two kernels side by side
under Nsight Compute:
    ncu --clock-control none -k regex:"decode_kernel|combine|flash_fwd" --metrics ... \
        python3 scripts/flashmla_ab.py FLASHMLA_DIR --seqlen 16384 --profile-launches 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla import bench
from jax_flashmla.device_timing import profile_call_ms

FLASHMLA_SOURCES = ("csrc/sm90/decode/dense/instantiations/bf16.cu", "csrc/smxx/decode/combine/combine.cu",
                    "csrc/smxx/decode/get_decoding_sched_meta/get_decoding_sched_meta.cu")
BINDING = """#include "api/dense_decode.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("dense_decode_fwd", &dense_attn_decode_interface); }
"""


def build_flashmla(src: Path, build_dir: Path, register_usage_level: int):
    """FlashMLA's dense decode as a torch extension with one function, dense_decode_fwd; one build per level."""
    import cutlass_library
    from torch.utils.cpp_extension import CUDA_HOME, load

    cutlass = Path(cutlass_library.__file__).parent / "source"
    build_dir = build_dir / f"register_usage_level_{register_usage_level}"
    build_dir.mkdir(parents=True, exist_ok=True)
    binding = build_dir / "flashmla_dense_binding.cpp"
    binding.write_text(BINDING)
    common = ["-O3", "-std=c++20", "-DNDEBUG", "-DFLASH_MLA_DISABLE_FP16", "-Wno-deprecated-declarations"]
    nvcc = common + ["--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-gencode", "arch=compute_90a,code=sm_90a",
                     f"--ptxas-options=--register-usage-level={register_usage_level}"]
    includes = [src / "csrc", src / "csrc" / "api", src / "csrc" / "kerutils" / "include", src / "csrc" / "sm90",
                cutlass / "include", cutlass / "tools" / "util" / "include", Path(CUDA_HOME) / "include" / "cccl"]
    return load(name=f"flashmla_dense_ab_rul{register_usage_level}",
                sources=[str(binding), *(str(src / s) for s in FLASHMLA_SOURCES)], extra_cflags=common,
                extra_cuda_cflags=nvcc, extra_include_paths=[str(p) for p in includes],
                build_directory=str(build_dir), verbose=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/flashmla_ab.py", description=__doc__.split("\n")[0])
    p.add_argument("flashmla_dir", type=Path)
    p.add_argument("--seqlen", default="4096,8192,16384,32768", help="mean lengths s_k (default FlashMLA's four)")
    p.add_argument("--pairs", default="1x16,2x128",
                   help="s_q x h_q shapes (default 1x16,2x128: a memory-bound and a compute-bound one); s_q > 1 "
                   "runs causal off and on")
    p.add_argument("--profile-launches", type=int, default=0,
                   help="time nothing; decode each row N more times on each side, for a profiler around the script")
    p.add_argument("--iters", type=int, default=50, help="calls per block (default 50)")
    p.add_argument("--rounds", type=int, default=3, help="alternating blocks per side (default 3)")
    p.add_argument("--register-usage-level", type=int, default=10, choices=range(11), metavar="0..10",
                   help="ptxas's --register-usage-level for FlashMLA's kernels (default 10, as its setup.py)")
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/flashmla_ab_build"))
    p.add_argument("--out", type=Path, default=Path("flashmla_ab_out"))
    args = p.parse_args(argv)
    try:
        pairs = [tuple(int(n) for n in pair.split("x")) for pair in args.pairs.split(",")]
    except ValueError:
        pairs = []
    if not pairs or not all(len(pair) == 2 and min(pair) >= 1 for pair in pairs):
        p.error(f"--pairs takes S_QxH_Q[,S_QxH_Q...] with positive integers, got {args.pairs!r}")
    if args.profile_launches < 0:
        p.error(f"--profile-launches must be >= 0, got {args.profile_launches}")

    import pynvml
    import torch

    flashmla = build_flashmla(args.flashmla_dir.resolve(), args.build_dir, args.register_usage_level)
    pynvml.nvmlInit()
    nvml_gpu = pynvml.nvmlDeviceGetHandleByIndex(0)

    def clock_and_power():
        return (pynvml.nvmlDeviceGetClockInfo(nvml_gpu, pynvml.NVML_CLOCK_SM),
                round(pynvml.nvmlDeviceGetPowerUsage(nvml_gpu) / 1e3))

    records = []
    for s_k in (int(s) for s in args.seqlen.split(",")):
        for s_q, h_q in pairs:
            for causal in (False,) if s_q == 1 else (False, True):
                config = bench.RowConfig(128, s_k, s_q, h_q, 1, causal, "bfloat16")
                lengths = bench.sample_lengths(config, False, 0)
                q, k_cache, table, seqlens = bench.make_inputs(jax.random.key(0), lengths, config)
                metadata = bench.get_mla_metadata(seqlens, s_q * h_q, 1)
                ours_args = jax.block_until_ready((q, k_cache, table, seqlens, *metadata))
                step = functools.partial(bench._decode_with_metadata, causal=causal, layer=None)
                decode_once = jax.jit(step)

                q_t, k_t, table_t, seqlens_t = (torch.from_dlpack(x) for x in (q, k_cache, table, seqlens))
                scale = bench.HEAD_DIM ** -0.5

                def flashmla_call(sched=(None, None)):
                    return flashmla.dense_decode_fwd(q_t, k_t, bench.HEAD_DIM_V, seqlens_t, table_t, scale, causal,
                                                     *sched)

                out_t, _, *sched = flashmla_call()  # the first call also computes FlashMLA's scheduler metadata
                ours_out = np.asarray(decode_once(*ours_args)[0].astype(jnp.float32))
                max_abs_diff = float(np.max(np.abs(ours_out - out_t.float().cpu().numpy())))

                if args.profile_launches > 0:
                    for _ in range(args.profile_launches):
                        jax.block_until_ready(decode_once(*ours_args))
                    for _ in range(args.profile_launches):
                        flashmla_call(sched)
                    torch.cuda.synchronize()
                    print(f"s_k {s_k:5d} s_q {s_q} h_q {h_q:3d} causal {int(causal)}: {args.profile_launches} more "
                          f"decodes each | max |diff| {max_abs_diff:.1e}", flush=True)
                    continue
                loop = bench.repeat_decode(step, args.iters).lower(*ours_args).compile()
                jax.block_until_ready(loop(*ours_args))  # warm-up of both
                flashmla_call(sched)
                ours_ms, theirs_ms, clocks = [], [], []
                for _ in range(args.rounds):
                    spans = profile_call_ms(loop, ours_args, bench.TIMED_SCOPE, args.iters, 1)
                    if spans is None:
                        sys.exit("the profiler gave no per-call device times for jax_flashmla's decode")
                    ours_ms.append(statistics.median(spans))
                    ours_clock = clock_and_power()
                    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                              for _ in range(args.iters)]
                    for start, end in events:
                        start.record()
                        flashmla_call(sched)
                        end.record()
                    torch.cuda.synchronize()
                    theirs_ms.append(statistics.median(start.elapsed_time(end) for start, end in events))
                    clocks.append({"jax_flashmla": ours_clock, "flashmla": clock_and_power()})

                flops, nbytes = bench.flops_and_bytes(config.batch, s_q, h_q, 1, float(lengths.mean()))
                ours, theirs = statistics.median(ours_ms), statistics.median(theirs_ms)
                record = {**dataclasses.asdict(config), "mean_len": float(lengths.mean()),
                          "jax_flashmla_ms": ours, "flashmla_ms": theirs, "time_ratio": ours / theirs,
                          "jax_flashmla_tflops": flops / ours / 1e9, "flashmla_tflops": flops / theirs / 1e9,
                          "jax_flashmla_gbps": nbytes / ours / 1e6, "flashmla_gbps": nbytes / theirs / 1e6,
                          "rounds_jax_flashmla_ms": ours_ms, "rounds_flashmla_ms": theirs_ms,
                          "sm_mhz_and_watts_after_each_block": clocks, "max_abs_diff": max_abs_diff,
                          "iters": args.iters, "device": jax.devices()[0].device_kind,
                          "flashmla_register_usage_level": args.register_usage_level}
                records.append(record)
                unit, key = ("GB/s", "gbps") if s_q == 1 else ("TFLOPS", "tflops")
                print(f"s_k {s_k:5d} s_q {s_q} h_q {h_q:3d} causal {int(causal)}: jax_flashmla {ours:.4f} ms "
                      f"{record['jax_flashmla_' + key]:.0f} {unit} | FlashMLA {theirs:.4f} ms "
                      f"{record['flashmla_' + key]:.0f} {unit} | time ratio {ours / theirs:.3f} | "
                      f"max |diff| {max_abs_diff:.1e}", flush=True)
                del loop, q_t, k_t, table_t, seqlens_t, out_t
    if args.profile_launches == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "flashmla_ab.json").write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
