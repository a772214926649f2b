// Merges the split-KV partials of sequences with more than one split: one warp per query row, the splits
// in index order (so the result does not depend on which CTA finished first). Also home of the element-type
// dispatch for the decode launcher.
#include <cmath>

#include "kernels/element.cuh"
#include "kernels/launch_environment.h"
#include "mla_params.h"

namespace jax_flashmla {

cudaError_t launch_decode_bf16(const DecodeParams& p, cudaStream_t stream);
cudaError_t launch_decode_fp16(const DecodeParams& p, cudaStream_t stream);

cudaError_t launch_decode(const DecodeParams& params, ElementType type, cudaStream_t stream) {
  return type == ElementType::kBF16 ? launch_decode_bf16(params, stream) : launch_decode_fp16(params, stream);
}

namespace {

// Whether num_splits gives a sequence more than one split, [first, next), inside the partial buffers' slots
// [0, slots). The values may be anything (a schedule for other lengths, say), so nothing is computed from them
// before they are bounded: first + count or next - first could wrap around.
__device__ __forceinline__ bool several_splits_inside(int first, int next, int slots) {
  return first >= 0 && first <= slots && next <= slots && next >= first + 2;
}

constexpr int kCombineWarps = 8;
static_assert(kMaxQueryRows <= kCombineWarps * kMaxGridYZ, "the grid's z dimension covers every query row");
constexpr int kHeadDimV = 512;

// The grid is (num_parts, h_kv, row blocks of kCombineWarps): the CTAs of part x combine the sequence whose
// second split starts that part (tile_metadata split_begin == 1), if any. Every sequence with more than one
// split has exactly one such part, so there are at most num_parts - 1 busy columns; a grid over the batch
// spent most of its CTAs finding nothing to do (4096 CTAs for b 128, h_q 128, s_q 2).
// Launched as the decode's programmatic dependent (the default), it may start while the decode
// still runs: it reads only the schedule (written by kernels that finished before the decode began) until
// griddepcontrol.wait has seen the decode finish and its results become visible. Every thread waits, those with
// nothing to merge too, so this grid never finishes before the decode. Otherwise the wait returns at once.
// Two experiments, off by default until measured on the whole grid (benchmarks/NOTES.md, version 2.25):
// JFM_COMBINE_EARLY_EXIT lets CTAs with nothing to merge leave before the wait; JFM_COMBINE_MIN_BLOCKS gives the
// launch bounds a minimum of CTAs per SM. With an explicit 1, ptxas allocates about 120 registers, not 64, and issues
// several splits' loads ahead of their sums, instead of one round trip per split.
#ifdef JFM_COMBINE_MIN_BLOCKS
#define JFM_COMBINE_BOUNDS __launch_bounds__(kCombineWarps * 32, JFM_COMBINE_MIN_BLOCKS)
#else
#define JFM_COMBINE_BOUNDS __launch_bounds__(kCombineWarps * 32)
#endif
template <typename T>
__global__ void JFM_COMBINE_BOUNDS combine_kernel(const DecodeParams p) {
  const int32_t* md = p.tile_metadata + static_cast<size_t>(blockIdx.x) * kMetadataRowInts;
  const int seq = md[0], head_kv = blockIdx.y;
  const int row = blockIdx.z * kCombineWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool merges = md[4] == 1 && seq >= 0 && seq < p.batch && row < p.q_rows;
  const int first = merges ? p.num_splits[seq] : 0, next = merges ? p.num_splits[seq + 1] : 0;
#ifdef JFM_COMBINE_EARLY_EXIT
  // A CTA with nothing to merge leaves now instead of holding registers beside the decode until it ends; CTA 0
  // always waits, so that the grid still never finishes before the decode.
  const bool block_merges = __syncthreads_or(merges);
  if (!block_merges && blockIdx.x + blockIdx.y + blockIdx.z != 0) return;
#endif
#ifndef JFM_PROBE_COMBINE_NO_WAIT  // a probe build without the wait, to show test_dependent_combine_launch can fail
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  // One split was written straight to out; a range outside the buffers means metadata for other lengths.
  if (!merges || !several_splits_inside(first, next, p.batch + p.num_parts)) return;
  const int count = next - first;

  auto slot = [&](int t) { return (static_cast<size_t>(first + t) * p.h_kv + head_kv) * p.q_rows + row; };
  float max_lse = -INFINITY;
  for (int t = lane; t < count; t += 32) max_lse = fmaxf(max_lse, p.lse_accum[slot(t)]);
  for (int offset = 16; offset > 0; offset /= 2) max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));

  float o[16] = {};
  float weight_sum = 0.f;
  if (max_lse != -INFINITY) {
    for (int t = 0; t < count; ++t) {
      const float w = expf(p.lse_accum[slot(t)] - max_lse);  // exp(-inf) = 0 for empty splits
      weight_sum += w;
      const float4* part = reinterpret_cast<const float4*>(p.o_accum + slot(t) * kHeadDimV);
      const float4 a = part[lane * 2], b = part[lane * 2 + 1], c = part[64 + lane * 2], d = part[64 + lane * 2 + 1];
      const float v[16] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w, c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w};
#pragma unroll
      for (int j = 0; j < 16; ++j) o[j] = fmaf(w, v[j], o[j]);
    }
  }
  const bool seen = weight_sum > 0.f;
  const float inv = seen ? 1.f / weight_sum : 0.f;
#pragma unroll
  for (int j = 0; j < 16; ++j) o[j] *= inv;
  const int group = p.h_q / p.h_kv;
  const int s_idx = row / group, head = head_kv * group + row % group;
  T* out = static_cast<T*>(p.out) + ((static_cast<size_t>(seq) * p.s_q + s_idx) * p.h_q + head) * kHeadDimV;
  *reinterpret_cast<uint4*>(out + lane * 8) = pack8<T>(&o[0]);
  *reinterpret_cast<uint4*>(out + 256 + lane * 8) = pack8<T>(&o[8]);
  if (lane == 0) p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s_idx] = seen ? max_lse + logf(weight_sum) : INFINITY;
}

}  // namespace

// The combine is launched as a programmatic dependent of the decode before it in the stream (the narrow and seesaw
// kernels allow it at their start; the others when they exit): its launch and its reads of the schedule overlap
// the decode's end, 1-2 us a decode on the H100 (NOTES.md, version 2.21). JAX_FLASHMLA_COMBINE=separate launches
// it after the decode instead.
cudaError_t launch_combine(const DecodeParams& p, ElementType type, cudaStream_t stream) {
  if (p.head_dim_v != kHeadDimV || p.q_rows < 1 || p.h_kv < 1 || p.num_parts < 1) return cudaErrorInvalidValue;
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(p.num_parts, p.h_kv, (p.q_rows + kCombineWarps - 1) / kCombineWarps);
  config.blockDim = dim3(kCombineWarps * 32);
  config.stream = stream;
  config.attrs = &dependent;
  config.numAttrs = environment_says("JAX_FLASHMLA_COMBINE", "separate") ? 0 : 1;
  const cudaError_t launched = type == ElementType::kBF16
                                   ? cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16>, p)
                                   : cudaLaunchKernelEx(&config, combine_kernel<__half>, p);
  const cudaError_t last = cudaGetLastError();  // also clears a launch error, which the next launch would report
  return launched != cudaSuccess ? launched : last;
}

}  // namespace jax_flashmla
