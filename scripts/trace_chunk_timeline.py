"""Writes a copy of the source tree whose seesaw kernel prints a clock64 timeline of each chunk.

Usage: python3 scripts/trace_chunk_timeline.py OUT_DIR
Then, on the GPU machine (scripts/gpu_env.sh sourced):
  python3 -m pip install --no-build-isolation --no-deps --target /tmp/variant_trace OUT_DIR
  PYTHONPATH=/tmp/variant_trace:$PYTHONPATH python3 -m jax_flashmla.bench --batch 512 --seqlen 1024 \\
      --s-q 2 --h-q 128 --causal off --fixed-lengths --no-baseline --iters 2 --repeats 1 --warmup 1 | grep TRACE

Thread 0 of each warpgroup, in the CTAs of row block 0 and parts 0 and 16, stamps clock64() at six points of
every chunk (up to 8 chunks) and prints the segments on the fourth launch of the kernel (a warm one):
loop top -> loads issued -> Q landed -> first S done -> pairs done -> row sums exchanged -> epilogue done.
benchmarks/NOTES.md ("Version 2.3: the chunk boundaries") reads one such run. The stamps slow the kernel by at
least 7%: compare segments with each other, not with untraced kernel times.

The stamps are inserted at text anchors of src/kernels/decode_seesaw.cuh. If the kernel changed so that an
anchor is missing or repeated, the script stops and names it: move the anchor, do not guess.
"""
import pathlib
import shutil
import subprocess
import sys

KERNEL = "src/kernels/decode_seesaw.cuh"

# (anchor, text inserted before it, or after it when the third field is True)
INSERTIONS = [
    ("template <typename T, bool kIsA>\n__device__ __forceinline__ void run_warpgroup(",
     "__device__ int g_trace_launches;  // launches of the kernel so far (counted by CTA 0)\n", False),
    ("  for (int seq = walk.first; seq <= walk.last; ++seq) {\n",
     "  const bool trace = thread == 0 && grid_row_block() == 0 && (grid_part() == 0 || grid_part() == 16);\n"
     "  const int launch = trace ? *(volatile int*)&g_trace_launches : 0;\n"
     "  long long stamps[8][7];\n"
     "  int chunk_pages[8];\n"
     "  int traced = 0;\n"
     "#define STAMP(k) if (trace && traced < 8) stamps[traced][k] = clock64();\n", False),
    ("    if (c.skip) continue;\n", "    STAMP(0)\n", True),
    ("      primed = 0;  // from here on, the bits are the next chunk's\n    }\n", "    STAMP(1)\n", True),
    ("    const char* q_rope", "    STAMP(2)\n", False),
    ("    for (int i = 0; i < n_tiles; i += 2) {\n", "    STAMP(3)\n", False),
    ("    // Epilogue: both halves share the row sums",
     "    STAMP(4)\n    if (trace && traced < 8) chunk_pages[traced] = n_tiles;\n", False),
    ("    acquire(s.sums_ready, chunks_done & 1);\n", "    STAMP(5)\n", True),
    ("    ++chunks_done;\n", "    STAMP(6)\n    ++traced;\n", True),
]

# Replaces the end of run_warpgroup (the loop's closing brace and the function's).
TAIL_ANCHOR = "    ++traced;\n  }\n}\n"
TAIL = """    ++traced;
  }
  if (trace && launch == 3) {
    for (int k = 0; k < traced && k < 8; ++k) {
      const long long* t = stamps[k];
      printf("TRACE %s part %d chunk %d pages %d: top->issued %lld, Q wait %lld, first S %lld, pairs %lld "
             "(%lld a page), sums %lld, epilogue %lld, ->next top %lld\\n",
             kIsA ? "A" : "B", grid_part(), k, chunk_pages[k], t[1] - t[0], t[2] - t[1], t[3] - t[2],
             t[4] - t[3], chunk_pages[k] > 0 ? (t[4] - t[3]) / chunk_pages[k] : 0, t[5] - t[4], t[6] - t[5],
             k + 1 < traced ? stamps[k + 1][0] - t[6] : 0);
    }
  }
  if (kIsA && thread == 0 && grid_row_block() == 0 && grid_part() == 0) atomicAdd(&g_trace_launches, 1);
}
"""


def instrument(text: str) -> str:
    for anchor, insert, after in INSERTIONS:
        count = text.count(anchor)
        if count != 1:
            sys.exit(f"{KERNEL}: anchor {anchor!r} found {count} times, expected once")
        text = text.replace(anchor, anchor + insert if after else insert + anchor)
    if text.count(TAIL_ANCHOR) != 1:
        sys.exit(f"{KERNEL}: the end of run_warpgroup ({TAIL_ANCHOR!r}) not found once")
    return text.replace(TAIL_ANCHOR, TAIL)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = pathlib.Path(__file__).resolve().parents[1]
    out = pathlib.Path(sys.argv[1]).resolve()
    if out.exists():
        shutil.rmtree(out)
    files = subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, out / name)
    kernel = out / KERNEL
    kernel.write_text(instrument(kernel.read_text()))
    print(f"instrumented copy in {out}")


if __name__ == "__main__":
    main()
