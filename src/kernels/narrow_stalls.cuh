// Where the narrow kernel's time goes, in a build made with -DJFM_NARROW_STALLS (scripts/compare_builds.sh takes
// the flag): the consumer's cycles waiting for page tiles to land (the DRAM side binds), waiting for its wgmmas
// (the tensor pipe binds), and in chunk ends (the epilogue); the producer's cycles waiting for a free ring
// slot (the consumer binds). It also times each decode's CTAs on the GPU's global clock (ns, one clock for every
// SM): when they start, when their first S is done (the first page landed), when their consumer ends, so the
// decode's span splits into the start (launch spread, first page), the stream, and the end's spread (how unevenly
// the schedule's parts finish). A one-thread kernel after each decode prints the means per CTA of every 32
// decodes of one shape. In every other build the macros only run their statement, and the kernels are unchanged.
#pragma once

#include <cstdio>

#ifdef JFM_NARROW_STALLS
#define JFM_TIMED(counter, ...)               \
  do {                                        \
    const long long jfm_t0 = clock64();       \
    __VA_ARGS__;                              \
    (counter) += clock64() - jfm_t0;          \
  } while (0)
#else
#define JFM_TIMED(counter, ...) \
  do {                          \
    __VA_ARGS__;                \
  } while (0)
#endif

#ifdef JFM_NARROW_STALLS
namespace jax_flashmla {
namespace narrow {

enum StallCounter { kTotal, kTileWait, kWgmmaWait, kChunkEnds, kRingFull, kPages, kCtas, kChunks, kStallCounters };

// One decode's clock readings (ns after kBase, the end of the print after the decode before, so that 132 of them
// sum without overflow): each CTA's start (min, max); over the CTAs that had a page, its first S's end (sum) and
// its consumer's end (min, max, sum, count). A part the schedule left empty (the last one, often) would end at
// once and drag the ends' mean down. print_stalls turns them into spans and adds those to g_spans.
enum Clock { kStartMin, kStartMax, kFirstSum, kFirstCtas, kEndMin, kEndMax, kEndSum, kEndCtas, kBase, kClocks };
enum Span { kSpan, kStartSpread, kFirstPage, kEndSpread, kEndMeanToMax, kSpans };

static __device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// One set per translation unit (per element type): each is its own module.
static __device__ unsigned long long g_stalls[kStallCounters];
static __device__ int g_stall_calls, g_stall_shape[3];
static __device__ unsigned long long g_clocks[kClocks] = {~0ull, 0, 0, 0, ~0ull, 0, 0, 0, 0};
static __device__ unsigned long long g_spans[kSpans];

static __device__ __forceinline__ void add_stall(StallCounter counter, long long value) {
  atomicAdd(&g_stalls[counter], static_cast<unsigned long long>(value));
}

static __device__ __forceinline__ unsigned long long since_base() { return global_ns() - g_clocks[kBase]; }

static __device__ __forceinline__ void clock_cta_start() {
  const unsigned long long t = since_base();
  atomicMin(&g_clocks[kStartMin], t);
  atomicMax(&g_clocks[kStartMax], t);
}
static __device__ __forceinline__ void clock_first_page() {
  atomicAdd(&g_clocks[kFirstSum], since_base());
  atomicAdd(&g_clocks[kFirstCtas], 1ull);
}
static __device__ __forceinline__ void clock_cta_end(bool had_pages) {
  if (!had_pages) return;
  const unsigned long long t = since_base();
  atomicMin(&g_clocks[kEndMin], t);
  atomicMax(&g_clocks[kEndMax], t);
  atomicAdd(&g_clocks[kEndSum], t);
  atomicAdd(&g_clocks[kEndCtas], 1ull);
}

// After each decode: counts it, and after 32 decodes of one shape (width, batch, parts) prints their means and
// starts over. A decode of another shape (a bench's next row) starts over without printing: the counts then mix
// two shapes.
static __global__ void print_stalls(int width, int batch, int parts) {
  // This decode's spans, from its clocks (every CTA ran and read them before this kernel started). A decode in
  // which no CTA had a page has no ends: its end spans are 0.
  const bool ended = g_clocks[kEndCtas] > 0;
  const unsigned long long start = g_clocks[kStartMin];
  const unsigned long long end_max = ended ? g_clocks[kEndMax] : start;
  const unsigned long long end_min = ended ? g_clocks[kEndMin] : start;
  const unsigned long long end_mean = ended ? g_clocks[kEndSum] / g_clocks[kEndCtas] : start;
  const unsigned long long first_mean =
      g_clocks[kFirstCtas] > 0 ? g_clocks[kFirstSum] / g_clocks[kFirstCtas] : start;
  const unsigned long long spans[kSpans] = {end_max - start, g_clocks[kStartMax] - start, first_mean - start,
                                            end_max - end_min, end_max - end_mean};
  const unsigned long long fresh[kClocks] = {~0ull, 0, 0, 0, ~0ull, 0, 0, 0, 0};
  for (int c = 0; c < kBase; ++c) g_clocks[c] = fresh[c];

  const bool same = g_stall_shape[0] == width && g_stall_shape[1] == batch && g_stall_shape[2] == parts;
  if (same) {
    for (int c = 0; c < kSpans; ++c) g_spans[c] += spans[c];
  }
  if (same && ++g_stall_calls == 32) {
    const double ctas_seen = g_stalls[kCtas] > 0 ? static_cast<double>(g_stalls[kCtas]) : 1.0;
    const double total = g_stalls[kTotal] > 0 ? static_cast<double>(g_stalls[kTotal]) : 1.0;
    auto share = [&](StallCounter c) { return 100.0 * static_cast<double>(g_stalls[c]) / total; };
    auto us = [&](Span c) { return static_cast<double>(g_spans[c]) / 32.0 / 1000.0; };
    printf("NARROW_STALLS kN %d, b %d, %d parts, 32 decodes: per CTA %.0f cycles, %.1f pages, %.2f chunks; consumer "
           "waiting for tiles %.1f%%, for wgmma %.1f%%, in chunk ends %.1f%%; producer waiting for a free slot "
           "%.1f%%\n",
           width, batch, parts, total / ctas_seen, static_cast<double>(g_stalls[kPages]) / ctas_seen,
           static_cast<double>(g_stalls[kChunks]) / ctas_seen, share(kTileWait), share(kWgmmaWait), share(kChunkEnds),
           share(kRingFull));
    printf("NARROW_CLOCKS kN %d, b %d, %d parts, 32 decodes, us: first CTA start to last consumer end %.2f; CTA "
           "starts spread over %.2f; first S done %.2f after the first start (mean); ends of the CTAs with pages "
           "spread over %.2f, the last %.2f after their mean\n",
           width, batch, parts, us(kSpan), us(kStartSpread), us(kFirstPage), us(kEndSpread), us(kEndMeanToMax));
  }
  if (!same || g_stall_calls == 32) {
    for (int c = 0; c < kStallCounters; ++c) g_stalls[c] = 0;
    for (int c = 0; c < kSpans; ++c) g_spans[c] = 0;
    g_stall_calls = 0;
    g_stall_shape[0] = width, g_stall_shape[1] = batch, g_stall_shape[2] = parts;
  }
  // The first decode's sums ran from a base of 0 and may have wrapped: its shape is new, so it was not counted.
  g_clocks[kBase] = global_ns();
}

}  // namespace narrow
}  // namespace jax_flashmla
#endif
