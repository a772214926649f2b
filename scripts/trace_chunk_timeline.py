"""Writes a copy of the source tree whose seesaw kernel records where its time goes, in clock64 cycles.

Usage: python3 scripts/trace_chunk_timeline.py OUT_DIR [--pair-waits | --pair-events | --tile-events]
       python3 scripts/trace_chunk_timeline.py --summarize LOG   (the records of a --tile-events run)
  (default)     a timeline of each chunk: thread 0 of each warpgroup, in the CTAs of row block 0 and of parts
                0 and gridDim.z / 2, stamps six points of every chunk (up to 8 chunks): loop top -> loads issued
                -> Q landed -> first S done -> pairs done -> row sums exchanged -> epilogue done.
  --pair-waits  per pair, for the same threads, the cycles spent waiting: for a page's tiles before its S
                (S-tile waits), for the other stage's V tiles before a P V, at the hand-offs between the
                warpgroups, for wgmma to complete, and the rest (issue, softmax, stores to shared memory).
  --pair-events per pair, for the same threads and pairs TRACE_PAIR0..TRACE_PAIR0+15 of the CTA (default 6;
                -DTRACE_PAIR0=N), when each hand-off, wgmma issue and wgmma completion happened, in cycles from
                A's start of the pair: which warpgroup waits for which, and what the tensor cores can have been
                doing meanwhile. PAIR_EVENT_NAMES lists the events of each warpgroup. Long chunks show the
                steady state: --batch 128 --seqlen 8192 in the command below.
  --tile-events per page tile, in the same CTAs and pairs as --pair-events: when its refill was issued (lane 0 of
                the issuing warp, just after its TMA) and when thread 0 of the warpgroup whose next S reads it began
                and ended its wait for the tile, in cycles from A's start of the pair. A refill issued in a pair and
                the wait of the next S issued in it concern the same page, so a tile waited for landed about when
                the wait ended: that minus its issue is the refill's latency. Which tiles the pair waits for, and
                how long a refill takes: on the memory rows (--s-q 1 --h-q 16, with --batch 128 --seqlen 8192 in
                the command below, and JAX_FLASHMLA_DECODE_KERNEL=seesaw, since head groups of at most 32 query
                rows run the narrow kernel by default) as on the compute rows. `--summarize LOG` reads the printed records back: per
                stage and tile, the medians over the pairs, and the latency of the tiles waited for.
Then, on the GPU machine (scripts/gpu_env.sh sourced):
  python3 -m pip install --no-build-isolation --no-deps --target /tmp/variant_trace OUT_DIR
  PYTHONPATH=/tmp/variant_trace:$PYTHONPATH python3 -m jax_flashmla.bench --batch 512 --seqlen 1024 \\
      --s-q 2 --h-q 128 --causal off --fixed-lengths --no-baseline --iters 2 --repeats 1 --warmup 1 | grep TRACE
The records are taken on the fourth launch of the decode kernel (a warm one; -DTRACE_LAUNCH=N in the build's
CMAKE_CUDA_FLAGS picks another) and go to a global buffer; a one-thread kernel launched after each decode
prints them once they are complete. The bench's timings of such a run mean nothing (2 iterations); compare
the records with each other, not with untraced kernel times. The pair-waits records also give the SM clock
the CTA ran at (clock64 cycles over the global timer's nanoseconds). Nothing prints unless the grid has at
least two parts (every bench row has 33 or more).

Why the printing kernel: a printf inside the decode kernel is a function call, and ptxas then serializes every
wgmma of the kernel (ptxas info C7510). The timelines of versions 2.3 and 2.4 (benchmarks/NOTES.md) were taken
that way, before this was noticed. tests/test_kernel_codegen.py compiles every mode's copy and checks that
ptxas leaves their wgmma alone.

The records are inserted at text anchors of src/kernels/decode_seesaw.cuh (and the printing kernel's launch at
one of src/kernels/decode_launch.cuh). If the kernel changed so that an anchor is missing or repeated, the
script stops and names it: move the anchor, do not guess.
"""
import pathlib
import re
import shutil
import subprocess
import sys

KERNEL = "src/kernels/decode_seesaw.cuh"
LAUNCH = "src/kernels/decode_launch.cuh"

# Shared by both modes: which threads record, on which launch, and the buffer the printing kernel reads.
PROLOGUE = """\
#ifndef TRACE_LAUNCH
#define TRACE_LAUNCH 3  // the launch recorded, counted from 0 (a warm one); build with -DTRACE_LAUNCH=N for another
#endif
// --pair-events and --tile-events record 16 pairs from this one on.
#ifndef TRACE_PAIR0
#define TRACE_PAIR0 6  // the first pair recorded, counted over the CTA's chunks (-DTRACE_PAIR0=N for another)
#endif
__device__ __forceinline__ long long trace_ns() {  // the global timer, in ns: with clock64, the SM clock
  long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}
static __device__ int g_trace_launches;  // launches of the decode kernel so far (counted by CTA 0)
static __device__ unsigned long long g_trace_first_ns = ~0ull, g_trace_last_ns;  // the launch's first start, last end
static __device__ int g_trace_ready;     // records complete: 4 (2 warpgroups x 2 CTAs); 5 once printed
static __device__ long long g_trace[2][2][8][9];  // [warpgroup][CTA][row][field]
static __device__ int g_trace_part[2];
__device__ __forceinline__ int trace_slot() {  // which recorded CTA this is, or -1
  if (grid_row_block() != 0) return -1;
  return grid_part() == 0 ? 0 : (grid_part() == gridDim.z / 2 ? 1 : -1);
}
"""

# The end of run_warpgroup (its loop's closing brace and its own, before the kernel), where each mode stores
# its records.
TAIL_ANCHOR = "  }\n}\n\ntemplate <typename T>\n__global__ void __launch_bounds__(kThreads, 1) decode_kernel("
TAIL = """  }
  if (thread == 0 && trace_launch == TRACE_LAUNCH) atomicMax(&g_trace_last_ns, trace_ns());
  if (thread == 0 && trace_slot() >= 0 && trace_launch == TRACE_LAUNCH) {
    long long(*out)[9] = g_trace[kIsA ? 0 : 1][trace_slot()];
{store}
    g_trace_part[trace_slot()] = grid_part();
    __threadfence();
    atomicAdd(&g_trace_ready, 1);
  }
  if (kIsA && thread == 0 && grid_row_block() == 0 && grid_part() == 0) atomicAdd(&g_trace_launches, 1);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel("""

PRINT_KERNEL = """static __global__ void trace_print_kernel() {
  if (g_trace_ready != 4) return;
  g_trace_ready = 5;
  printf("TRACE launch %d: from the first CTA's start to the last one's end, %llu us\\n", TRACE_LAUNCH,
         (g_trace_last_ns - g_trace_first_ns) / 1000);
  for (int w = 0; w < 2; ++w)
    for (int k = 0; k < 2; ++k) {
{print}
    }
}
"""

LAUNCH_ANCHOR = """    return launch_with_smem<seesaw::decode_kernel<T>, seesaw::kThreads, seesaw::kSmemBytes>(device, grid, stream, p,
                                                                                           kv_map, q_map, q_box_bytes);"""
LAUNCH_TRACED = """    const cudaError_t traced = launch_with_smem<seesaw::decode_kernel<T>, seesaw::kThreads, seesaw::kSmemBytes>(
        device, grid, stream, p, kv_map, q_map, q_box_bytes);
    seesaw::trace_print_kernel<<<1, 1, 0, stream>>>();
    return traced;"""

# --- the chunk timeline ----------------------------------------------------------------------------------
# (anchor, text inserted before it, or after it when the third field is True)
TIMELINE = [
    ("  for (int seq = walk.first; seq <= walk.last; ++seq) {\n",
     "  const bool trace = thread == 0 && trace_slot() >= 0;\n"
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
TIMELINE_STORE = """\
    for (int k = 0; k < traced && k < 8; ++k) {
      for (int f = 0; f < 7; ++f) out[k][f] = stamps[k][f];
      out[k][7] = k + 1 < traced && k + 1 < 8 ? stamps[k + 1][0] - stamps[k][6] : 0;  // to the next top
      out[k][8] = chunk_pages[k];
    }
    for (int k = traced; k < 8; ++k) out[k][0] = -1;"""
TIMELINE_PRINT = """\
      for (int c = 0; c < 8; ++c) {
        const long long* t = g_trace[w][k][c];
        if (t[0] < 0) break;
        const long long pages = t[8];
        printf("TRACE %s part %d chunk %d pages %lld: top->issued %lld, Q wait %lld, first S %lld, pairs %lld "
               "(%lld a page), sums %lld, epilogue %lld, ->next top %lld\\n",
               w == 0 ? "A" : "B", g_trace_part[k], c, pages, t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3],
               pages > 0 ? (t[4] - t[3]) / pages : 0, t[5] - t[4], t[6] - t[5], t[7]);
      }"""

# --- the waits of each pair -------------------------------------------------------------------------------
PAIR_WAITS = [
    ("  SharedStorage& s;\n  const int thread;  // 0..127 within the warpgroup\n",
     "  mutable long long s_wait = 0, v_wait = 0;  // traced: cycles waiting for S's and for V's tiles\n", True),
    ("  const PartWalk walk(p);\n",
     "  long long h_wait = 0, g_wait = 0, pair_cycles = 0;\n"
     "#define TRACED_ACQUIRE(b, ph) { const long long t0 = clock64(); acquire(b, ph); h_wait += clock64() - t0; }\n"
     "#define TRACED_WAIT(n) { const long long t0 = clock64(); warpgroup_wait<n>(); g_wait += clock64() - t0; }\n",
     True),
    ("    for (int i = 0; i < n_tiles; i += 2) {\n", "    const long long pairs_begin = clock64();\n", False),
    ("    // Epilogue: both halves share the row sums", "    pair_cycles += clock64() - pairs_begin;\n", False),
]
PAIR_WAITS_REPLACE = [  # (old, new, count): in the whole kernel
    ("      wait_barrier(s.full[kStage][t], phase);\n",
     "      { const long long t0 = clock64(); wait_barrier(s.full[kStage][t], phase); s_wait += clock64() - t0; }\n", 1),
    ("      wait_barrier(s.full[kStage][kRopeTile], phase);\n",
     "      { const long long t0 = clock64(); wait_barrier(s.full[kStage][kRopeTile], phase); "
     "s_wait += clock64() - t0; }\n", 1),
    ("    for (int t = first; t < end; ++t) wait_barrier(s.full[stage][t], phase);\n",
     "    const long long t0 = clock64();\n"
     "    for (int t = first; t < end; ++t) wait_barrier(s.full[stage][t], phase);\n"
     "    v_wait += clock64() - t0;\n", 1),
] + [(f"acquire(s.{name}, hand_off_phase);", f"TRACED_ACQUIRE(s.{name}, hand_off_phase);", 1)
     for name in ("scale0_ready", "scale1_ready", "p0_ready", "p1_ready")]
PAIR_WAITS_STORE = """\
    out[0][0] = pairs_done, out[0][1] = pair_cycles, out[0][2] = wg.s_wait, out[0][3] = wg.v_wait;
    out[0][4] = h_wait, out[0][5] = g_wait;
    out[0][6] = clock64() - trace_cycles0, out[0][7] = trace_ns() - trace_ns0;"""
PAIR_WAITS_PRINT = """\
      const long long* o = g_trace[w][k][0];
      const long long n = o[0] > 0 ? o[0] : 1;
      printf("TRACE %s part %d: %lld pairs, %lld cycles a pair; per pair: S-tile waits %lld, V-tile waits %lld, "
             "hand-off waits %lld, wgmma waits %lld, rest %lld; SM clock %lld MHz over the CTA's %lld us\\n",
             w == 0 ? "A" : "B", g_trace_part[k], o[0], o[1] / n, o[2] / n, o[3] / n, o[4] / n, o[5] / n,
             (o[1] - o[2] - o[3] - o[4] - o[5]) / n, o[7] > 0 ? o[6] * 1000 / o[7] : 0, o[7] / 1000);"""


# --- the events of each pair ------------------------------------------------------------------------------
# Per warpgroup, the kernel text around each event, "|" where the stamp goes (each text must occur once).
PAIR_EVENTS = {
    "A": [
        "        release(s.scale0_ready);\n|",
        "thr_rs.partition_fragment_B(wg.v_half(0)), tO);\n        warpgroup_fence_operand(tP_words);\n|",
        "        warpgroup_wait<0>();\n|        if (refill0) {\n",
        "        acquire(s.scale1_ready, hand_off_phase);\n|",
        "        release(s.p0_ready);\n|",
        "        acquire(s.p1_ready, hand_off_phase);\n|",
        "valid, true, 0, 4);\n        }\n|",
        "            warpgroup_wait<0>();\n|          if (refill1)",
        "valid, false, 4, kNumChunks);\n|",
        "        warpgroup_wait<0>();\n|      } else {\n",
    ],
    "B": [
        "        acquire(s.scale0_ready, hand_off_phase);\n|",
        "        release(s.scale1_ready);\n|",
        "        release(s.p1_ready);\n|",
        "        acquire(s.p0_ready, hand_off_phase);\n|",
        "thr_ss.partition_fragment_B(wg.v_half(0)), tO);\n|",
        "          warpgroup_wait<1>();\n|          refill_tiles(p, kv_map, s, layer, hint, 1, next_page1, 4",
        "        warpgroup_wait<0>();\n|        if (refill0) refill_tiles",
        "valid, false, 0, 4);\n|",
        "          warpgroup_wait<0>();\n        }\n|      }\n      ++pairs_done;\n",
    ],
}
PAIR_EVENT_NAMES = {  # event 0 of both: the pair's start (the warpgroup's S of it complete)
    "A": ["start", "m0 released", "P0 V0_left issued", "P0 V0_left done", "m1 acquired", "P0' released",
          "P1 acquired", "P1 V1_left and next S0 tiles 0-3 issued", "P1 V1_left done", "next S0 tiles 4-8 issued",
          "next S0 done"],
    "B": ["start", "m0 acquired", "m1 released", "P1 V1_right issued, P1 released", "P0' acquired",
          "P0' V0_right issued", "P1 V1_right done", "P0' V0_right done", "next S1 issued", "next S1 done"],
}
PAIR_EVENTS_SETUP = """\
  const bool event_cta = thread == 0 && trace_slot() >= 0 && trace_launch == TRACE_LAUNCH;
#define EVENT(k) if (event_row) event_row[k] = clock64();
"""
# In the three texts below, @EVENTS@ stands for the most events of a warpgroup (the records' fields 0..@EVENTS@-1;
# field @EVENTS@ is the pair's first page in its chunk, the next one the chunk's pages), @EVENTS_A@ / @EVENTS_B@
# for each warpgroup's count and @NAMES_A@ / @NAMES_B@ for their names (printf's format: no % in a name), all from
# PAIR_EVENT_NAMES.
PAIR_EVENTS_TOP = """\
      long long* event_row = nullptr;  // this pair's records, when it is one of those recorded
      if (event_cta && pairs_done >= TRACE_PAIR0 && pairs_done < TRACE_PAIR0 + 16) {
        event_row = g_trace_events[kIsA ? 0 : 1][trace_slot()][pairs_done - TRACE_PAIR0];
        event_row[@EVENTS@] = i, event_row[@EVENTS@ + 1] = n_tiles;
      }
      EVENT(0)
"""
PAIR_EVENTS_BUFFER = ("static __device__ long long g_trace_events[2][2][16][@EVENTS@ + 2];"
                      "  // [warpgroup][CTA][pair][field]\n")
PAIR_EVENTS_PRINT = """\
      if (w == 0 && k == 0)
        printf("TRACE events, cycles from A's start of each pair: A {@NAMES_A@}; B {@NAMES_B@}\\n");
      for (int q = 0; q < 16; ++q) {
        const long long* e = g_trace_events[w][k][q];
        const long long start = g_trace_events[0][k][q][0];
        if (start == 0) break;
        printf("TRACE %s part %d pair %d (pages %lld-%lld of %lld):", w == 0 ? "A" : "B", g_trace_part[k],
               TRACE_PAIR0 + q, e[@EVENTS@], e[@EVENTS@] + 1, e[@EVENTS@ + 1]);
        for (int f = 0; f < (w == 0 ? @EVENTS_A@ : @EVENTS_B@); ++f) printf(" %lld", e[f] != 0 ? e[f] - start : -1);
        printf("\\n");
      }"""


# --- the tiles of each pair -------------------------------------------------------------------------------
TILE_EVENTS_BUFFER = """\
static __device__ long long g_tile_events[2][16][2][kNumChunks][3];  // [CTA][pair][stage][tile][issued, wait begun, ended]
static __device__ long long g_tile_pair[2][16][3];  // [CTA][pair]: A's start of the pair, its first page, the chunk's pages
"""
# The refills inside the pair loop go through this, which stamps each tile after its warp issued it.
TILE_REFILL = """\
__device__ __forceinline__ void traced_refill_tiles(long long* tile_row, const DecodeParams& p,
                                                    const CUtensorMap* kv_map, SharedStorage& s, int layer,
                                                    uint64_t hint, int stage, int page, int first, int last,
                                                    int thread) {
  refill_tiles(p, kv_map, s, layer, hint, stage, page, first, last, thread);
  if (tile_row == nullptr || thread % 32 != 0) return;
  const long long now = clock64();
  for (int t = first + thread / 32; t <= last; t += 4) tile_row[(stage * kNumChunks + t) * 3] = now;
}
"""
TILE_EVENTS = [  # (anchor, text inserted before it, or after it when the third field is True)
    ("  SharedStorage& s;\n  const int thread;  // 0..127 within the warpgroup\n",
     "  long long* tile_row = nullptr;  // traced: this pair's [stage][tile][3] records, or null\n", True),
    ("// How Q reaches shared memory.", TILE_REFILL + "\n", False),
    ("    atomicMin(&g_trace_first_ns, static_cast<unsigned long long>(trace_ns0));\n",
     "  const bool tile_cta = trace_slot() >= 0 && trace_launch == TRACE_LAUNCH;\n", True),
    ("      const bool has_k1 = i + 1 < n_tiles;\n",
     "      wg.tile_row = nullptr;\n"
     "      if (tile_cta && pairs_done >= TRACE_PAIR0 && pairs_done < TRACE_PAIR0 + 16) {\n"
     "        wg.tile_row = &g_tile_events[trace_slot()][pairs_done - TRACE_PAIR0][0][0][0];\n"
     "        if (kIsA && thread == 0) {\n"
     "          long long* pair = g_tile_pair[trace_slot()][pairs_done - TRACE_PAIR0];\n"
     "          pair[0] = clock64(), pair[1] = i, pair[2] = n_tiles;\n"
     "        }\n"
     "      }\n", False),
    # The next chunk's first S is no pair's.
    ("    // Epilogue: both halves share the row sums", "    wg.tile_row = nullptr;\n", False),
]
TILE_WAIT = ("{ const long long t0 = clock64(); wait_barrier(s.full[kStage][@T@], phase); "
             "if (tile_row != nullptr && thread == 0) { tile_row[(kStage * kNumChunks + @T@) * 3 + 1] = t0; "
             "tile_row[(kStage * kNumChunks + @T@) * 3 + 2] = clock64(); } }")
TILE_EVENTS_REPLACE = [  # (old, new, count): in the whole kernel
    ("      wait_barrier(s.full[kStage][t], phase);\n", "      " + TILE_WAIT.replace("@T@", "t") + "\n", 1),
    ("      wait_barrier(s.full[kStage][kRopeTile], phase);\n",
     "      " + TILE_WAIT.replace("@T@", "kRopeTile") + "\n", 1),
]
TILE_EVENTS_PRINT = """\
      if (w != 0) continue;  // one warpgroup's pass prints both stages
      if (k == 0)
        printf("TRACE tiles: per tile t, t:issued/wait begun/wait ended, cycles from A's start of the pair (-1: none)\\n");
      for (int q = 0; q < 16; ++q) {
        const long long* pair = g_tile_pair[k][q];
        if (pair[0] == 0) break;
        for (int stage = 0; stage < 2; ++stage) {
          const long long next = q + 1 < 16 ? g_tile_pair[k][q + 1][0] : 0;
          printf("TRACE tiles part %d pair %d (pages %lld-%lld of %lld, %lld cycles) stage %d:", g_trace_part[k],
                 TRACE_PAIR0 + q, pair[1], pair[1] + 1, pair[2], next != 0 ? next - pair[0] : -1, stage);
          for (int t = 0; t < kNumChunks; ++t) {
            const long long* e = g_tile_events[k][q][stage][t];
            printf(" %d:%lld/%lld/%lld", t, e[0] != 0 ? e[0] - pair[0] : -1, e[1] != 0 ? e[1] - pair[0] : -1,
                   e[2] != 0 ? e[2] - pair[0] : -1);
          }
          printf("\\n");
        }
      }"""


def _insert(text: str, insertions) -> str:
    for anchor, insert, after in insertions:
        count = text.count(anchor)
        if count != 1:
            sys.exit(f"{KERNEL}: anchor {anchor!r} found {count} times, expected once")
        text = text.replace(anchor, anchor + insert if after else insert + anchor)
    return text


def _replace(text: str, path: str, old: str, new: str, count: int = 1) -> str:
    found = text.count(old)
    if found != count:
        sys.exit(f"{path}: anchor {old!r} found {found} times, expected {count}")
    return text.replace(old, new)


MODES = ("timeline", "pair-waits", "pair-events", "tile-events")


def _instrument_pair_events(text: str) -> tuple[str, str]:
    """The pair-events stamps in the kernel, and the printing kernel's body."""
    counts = {role: len(names) for role, names in PAIR_EVENT_NAMES.items()}
    tokens = {"@EVENTS@": str(max(counts.values())), "@EVENTS_A@": str(counts["A"]), "@EVENTS_B@": str(counts["B"])}
    for role, names in PAIR_EVENT_NAMES.items():
        tokens[f"@NAMES_{role}@"] = ", ".join(f"{k} {name}" for k, name in enumerate(names))

    def fill(template: str) -> str:
        for token, value in tokens.items():
            template = template.replace(token, value)
        return template

    text = _insert(text, [("    atomicMin(&g_trace_first_ns, static_cast<unsigned long long>(trace_ns0));\n",
                           PAIR_EVENTS_SETUP, True),
                          ("      const bool has_k1 = i + 1 < n_tiles;\n", fill(PAIR_EVENTS_TOP), False)])
    for role, anchors in PAIR_EVENTS.items():
        for k, anchor in enumerate(anchors, start=1):
            text = _replace(text, KERNEL, anchor.replace("|", ""), anchor.replace("|", f"        EVENT({k})\n"))
    text = _replace(text, KERNEL, "static __device__ int g_trace_part[2];\n",
                    "static __device__ int g_trace_part[2];\n" + fill(PAIR_EVENTS_BUFFER))
    return text, fill(PAIR_EVENTS_PRINT)


def _instrument_tile_events(text: str) -> str:
    """The tile stamps in the kernel: every refill of the pair loop, and the S-tile waits."""
    refill_call = "refill_tiles(p, kv_map, s, layer, hint, "
    if text.count(refill_call) == 0:
        sys.exit(f"{KERNEL}: no refill call {refill_call!r} found")
    text = text.replace(refill_call, "traced_refill_tiles(wg.tile_row, p, kv_map, s, layer, hint, ")
    text = _insert(text, TILE_EVENTS)
    for old, new, count in TILE_EVENTS_REPLACE:
        text = _replace(text, KERNEL, old, new, count)
    return _replace(text, KERNEL, "static __device__ int g_trace_part[2];\n",
                    "static __device__ int g_trace_part[2];\n" + TILE_EVENTS_BUFFER)


TILE_LINE = re.compile(r"TRACE tiles part (\d+) pair (\d+) \(pages (\d+)-\d+ of (\d+), (-?\d+) cycles\) stage (\d):(.*)")
WAITED = 100  # cycles: a wait longer than a try_wait that finds the tile landed


def summarize_tile_events(lines, waited: int = WAITED) -> str:
    """Per stage and tile, over the recorded pairs (all CTAs): medians of the refill's issue, of the wait's begin
    and end, of the wait, and of the refill's latency (wait end minus issue) over the tiles waited for."""
    import statistics

    rows, pair_cycles = {}, {}
    for line in lines:
        m = TILE_LINE.search(line)
        if not m:
            continue
        part, pair, stage = int(m.group(1)), int(m.group(2)), int(m.group(6))
        if int(m.group(5)) > 0:
            pair_cycles[(part, pair)] = int(m.group(5))
        for field in m.group(7).split():
            tile, values = field.split(":")
            issued, begun, ended = (int(v) for v in values.split("/"))
            rows.setdefault((stage, int(tile)), []).append((issued, begun, ended))
    if not rows:
        return "no tile records (lines starting 'TRACE tiles part')"

    def median(values):
        return f"{statistics.median(values):7.0f}" if values else "      -"

    out = [f"{len(pair_cycles)} pairs with a length: median {median(list(pair_cycles.values())).strip()} cycles",
           f"stage tile  pairs  issued   begun   ended    wait  waited (> {waited})  latency of those"]
    for (stage, tile), records in sorted(rows.items()):
        issued = [r[0] for r in records if r[0] >= 0]
        begun = [r[1] for r in records if r[1] >= 0]
        ended = [r[2] for r in records if r[2] >= 0]
        waits = [r[2] - r[1] for r in records if r[1] >= 0 and r[2] >= 0]
        latency = [r[2] - r[0] for r in records if r[0] >= 0 and r[1] >= 0 and r[2] - r[1] > waited]
        out.append(f"{stage:5d} {tile:4d} {len(records):6d} {median(issued)} {median(begun)} {median(ended)} "
                   f"{median(waits)} {len(latency):6d} of {len(waits):3d}     {median(latency)}")
    return "\n".join(out)


def instrument(text: str, mode: str = "timeline") -> str:
    """The seesaw kernel's source with the records of one mode (MODES) and the kernel that prints them."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    run_warpgroup = "template <typename T, bool kIsA>\n__device__ __forceinline__ void run_warpgroup("
    text = _replace(text, KERNEL, run_warpgroup, PROLOGUE + run_warpgroup)
    # Read at the start: CTA 0 counts the launch at its end, which may come before another CTA's end.
    text = _insert(text, [("  const PartWalk walk(p);\n",
                           "  const int trace_launch = *(volatile int*)&g_trace_launches;\n"
                           "  const long long trace_ns0 = trace_ns(), trace_cycles0 = clock64();\n"
                           "  if (thread == 0 && trace_launch == TRACE_LAUNCH)\n"
                           "    atomicMin(&g_trace_first_ns, static_cast<unsigned long long>(trace_ns0));\n",
                           True)])
    if mode == "pair-waits":
        text = _insert(text, PAIR_WAITS)
        for old, new, count in PAIR_WAITS_REPLACE:
            text = _replace(text, KERNEL, old, new, count)
        # Waits for wgmma inside the pair loop only: the chunk's first S is not a pair.
        begin = text.index("    for (int i = 0; i < n_tiles; i += 2) {\n")
        end = text.index("    pair_cycles += clock64() - pairs_begin;\n")
        loop = re.sub(r"warpgroup_wait<(\d)>\(\);", r"TRACED_WAIT(\1)", text[begin:end])
        text = text[:begin] + loop + text[end:]
        store, print_body = PAIR_WAITS_STORE, PAIR_WAITS_PRINT
    elif mode == "pair-events":
        text, print_body = _instrument_pair_events(text)
        store = ""  # stored as they happen
    elif mode == "tile-events":
        text = _instrument_tile_events(text)
        store, print_body = "", TILE_EVENTS_PRINT  # stored as they happen
    else:
        text = _insert(text, TIMELINE)
        store, print_body = TIMELINE_STORE, TIMELINE_PRINT
    text = _replace(text, KERNEL, TAIL_ANCHOR, TAIL.replace("{store}", store))
    namespace_end = "}  // namespace seesaw\n"
    return _replace(text, KERNEL, namespace_end, PRINT_KERNEL.replace("{print}", print_body) + "\n" + namespace_end)


def instrument_launch(text: str) -> str:
    """decode_launch.cuh with the printing kernel launched after each seesaw decode."""
    return _replace(text, LAUNCH, LAUNCH_ANCHOR, LAUNCH_TRACED)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        print(summarize_tile_events(pathlib.Path(sys.argv[2]).read_text().splitlines()))
        return
    flags = {f"--{m}": m for m in MODES[1:]}
    args = [a for a in sys.argv[1:] if a not in flags]
    modes = [flags[a] for a in sys.argv[1:] if a in flags]
    if len(args) != 1 or len(modes) > 1:
        sys.exit(__doc__)
    mode = modes[0] if modes else "timeline"
    root = pathlib.Path(__file__).resolve().parents[1]
    out = pathlib.Path(args[0]).resolve()
    if out.exists():
        shutil.rmtree(out)
    files = subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, out / name)
    (out / KERNEL).write_text(instrument((out / KERNEL).read_text(), mode))
    (out / LAUNCH).write_text(instrument_launch((out / LAUNCH).read_text()))
    print(f"instrumented copy ({mode}) in {out}")


if __name__ == "__main__":
    main()
