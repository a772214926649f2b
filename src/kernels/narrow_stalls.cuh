// Where the narrow kernel's time goes, in a build made with -DJFM_NARROW_STALLS (scripts/compare_builds.sh takes
// the flag): the consumer's cycles waiting for page tiles to land (the DRAM side binds), waiting for its wgmmas
// (the tensor pipe binds), and in chunk ends (the epilogue); the producer's cycles waiting for a free ring
// slot (the consumer binds). A one-thread kernel after each decode prints the means per CTA of every 32 decodes of
// one shape. In every other build the macros only run their statement, and the kernels are unchanged.
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

enum StallCounter { kTotal, kTileWait, kWgmmaWait, kChunkEnds, kRingFull, kPages, kCtas, kStallCounters };

// One set per translation unit (per element type): each is its own module.
static __device__ unsigned long long g_stalls[kStallCounters];
static __device__ int g_stall_calls, g_stall_shape[3];

static __device__ __forceinline__ void add_stall(StallCounter counter, long long value) {
  atomicAdd(&g_stalls[counter], static_cast<unsigned long long>(value));
}

// After each decode: counts it, and after 32 decodes of one shape (width, batch, parts) prints their means and
// starts over. A decode of another shape (a bench's next row) starts over without printing: the counts then mix
// two shapes.
static __global__ void print_stalls(int width, int batch, int parts) {
  const bool same = g_stall_shape[0] == width && g_stall_shape[1] == batch && g_stall_shape[2] == parts;
  if (same && ++g_stall_calls == 32) {
    const double ctas = g_stalls[kCtas] > 0 ? static_cast<double>(g_stalls[kCtas]) : 1.0;
    const double total = g_stalls[kTotal] > 0 ? static_cast<double>(g_stalls[kTotal]) : 1.0;
    auto share = [&](StallCounter c) { return 100.0 * static_cast<double>(g_stalls[c]) / total; };
    printf("NARROW_STALLS kN %d, b %d, %d parts, 32 decodes: per CTA %.0f cycles, %.1f pages; consumer waiting for "
           "tiles %.1f%%, for wgmma %.1f%%, in chunk ends %.1f%%; producer waiting for a free slot %.1f%%\n",
           width, batch, parts, total / ctas, static_cast<double>(g_stalls[kPages]) / ctas, share(kTileWait),
           share(kWgmmaWait), share(kChunkEnds), share(kRingFull));
  }
  if (!same || g_stall_calls == 32) {
    for (int c = 0; c < kStallCounters; ++c) g_stalls[c] = 0;
    g_stall_calls = 0;
    g_stall_shape[0] = width, g_stall_shape[1] = batch, g_stall_shape[2] = parts;
  }
}

}  // namespace narrow
}  // namespace jax_flashmla
#endif
