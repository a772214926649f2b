// Merges the split-KV partials of sequences with more than one split: two or four warps per query row, the
// splits in index order (so the result depends neither on which CTA finished first nor on the warps per row).
// Also home of the element-type dispatch for the decode launcher.
#include <algorithm>
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
constexpr int kHeadDimV = 512;
// Floats of partial O a lane holds in flight: the splits' loads are issued this many floats at a time before their
// sums, so a row waits one memory round trip per batch of splits, not per split, within the 64 registers that let
// two combine CTAs wait beside a 16-row narrow decode CTA (benchmarks/NOTES.md, versions 2.24 and 2.26).
constexpr int kFloatsInFlight = 32;

// kSlices warps share a query row, each merging kHeadDimV / kSlices of its dims: more slices, more warps, and more
// splits' loads in flight per warp for the same registers. The launcher picks the count from the schedule's shape.
// (One warp a row, 16 floats a lane and two splits ahead, was slower than two or four; eight warps, 2 floats a lane
// and sixteen splits ahead, gained nothing at b 8: NOTES.md, versions 2.26 and 2.27.)
template <int kSlices>
struct CombineShape {
  static_assert(kSlices == 2 || kSlices == 4, "a lane holds 8 or 4 floats of a row");
  static constexpr int kRowsPerCta = kCombineWarps / kSlices;
  static constexpr int kLaneFloats = kHeadDimV / kSlices / 32;
  static constexpr int kLaneVectors = kLaneFloats / 4;  // float4 loads per lane and split
  static constexpr int kSplitsAhead = kFloatsInFlight / kLaneFloats;
  __host__ __device__ static int row_blocks(int q_rows) { return (q_rows + kRowsPerCta - 1) / kRowsPerCta; }
};

// Merges splits [first, first + count) of one query row's slice: the splits in index order, each output element
// one chain of fmaf whatever kSlices (so the bits do not depend on it). Every split's partial load is independent
// of the LSEs, so the first batch is issued before the LSE maximum is known.
template <typename T, int kSlices>
__device__ __forceinline__ void merge_row(const DecodeParams& p, int seq, int head_kv, int row, int slice, int lane,
                                          int first, int count) {
  using Shape = CombineShape<kSlices>;
  const auto slot = [&](int t) { return (static_cast<size_t>(first + t) * p.h_kv + head_kv) * p.q_rows + row; };
  const int lane_offset = slice * (kHeadDimV / kSlices) + lane * Shape::kLaneFloats;  // first float of this lane

  float4 partial[Shape::kSplitsAhead][Shape::kLaneVectors];
  const auto load_batch = [&](int base) {
#pragma unroll
    for (int k = 0; k < Shape::kSplitsAhead; ++k) {
      if (base + k >= count) break;
      const float4* src = reinterpret_cast<const float4*>(p.o_accum + slot(base + k) * kHeadDimV + lane_offset);
#pragma unroll
      for (int v = 0; v < Shape::kLaneVectors; ++v) partial[k][v] = src[v];
    }
  };
  // Lane t holds the LSE of split chunk + t, for the 32 splits from `chunk` on; the weights pass by shuffle.
  const auto load_lse_chunk = [&](int chunk) {
    return chunk + lane < count ? p.lse_accum[slot(chunk + lane)] : -INFINITY;
  };
  float lse_chunk = load_lse_chunk(0);
  load_batch(0);

  float max_lse = fmaxf(-INFINITY, lse_chunk);
#pragma unroll 1  // rare (more than 32 splits), and unrolled it would hold registers beside the partials in flight
  for (int t = lane + 32; t < count; t += 32) max_lse = fmaxf(max_lse, p.lse_accum[slot(t)]);
  for (int offset = 16; offset > 0; offset /= 2)
    max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));

  float o[Shape::kLaneFloats] = {};
  float weight_sum = 0.f;
  if (max_lse != -INFINITY) {  // all splits empty: out 0, lse +inf
    static_assert(32 % Shape::kSplitsAhead == 0, "a batch of splits never straddles two LSE chunks");
    for (int base = 0; base < count; base += Shape::kSplitsAhead) {
      if (base > 0) {
        if (base % 32 == 0) lse_chunk = load_lse_chunk(base);
        load_batch(base);
      }
#pragma unroll
      for (int k = 0; k < Shape::kSplitsAhead; ++k) {
        if (base + k >= count) break;
        const float split_lse = __shfl_sync(0xffffffffu, lse_chunk, (base + k) % 32);
        const float w = expf(split_lse - max_lse);  // exp(-inf) = 0 for empty splits
        weight_sum += w;
#pragma unroll
        for (int v = 0; v < Shape::kLaneVectors; ++v) {
          float* lane_o = o + 4 * v;
          const float4 x = partial[k][v];
          lane_o[0] = fmaf(w, x.x, lane_o[0]);
          lane_o[1] = fmaf(w, x.y, lane_o[1]);
          lane_o[2] = fmaf(w, x.z, lane_o[2]);
          lane_o[3] = fmaf(w, x.w, lane_o[3]);
        }
      }
    }
  }
  const bool seen = weight_sum > 0.f;
  const float inv = seen ? 1.f / weight_sum : 0.f;
#pragma unroll
  for (int j = 0; j < Shape::kLaneFloats; ++j) o[j] *= inv;
  const int group = p.h_q / p.h_kv;
  const int s_idx = row / group, head = head_kv * group + row % group;
  T* out = static_cast<T*>(p.out) + ((static_cast<size_t>(seq) * p.s_q + s_idx) * p.h_q + head) * kHeadDimV +
           lane_offset;
  if constexpr (Shape::kLaneFloats == 4) {
    *reinterpret_cast<uint2*>(out) = pack4<T>(o);
  } else {
#pragma unroll
    for (int j = 0; j < Shape::kLaneFloats; j += 8) *reinterpret_cast<uint4*>(out + j) = pack8<T>(&o[j]);
  }
  if (slice == 0 && lane == 0)
    p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s_idx] = seen ? max_lse + logf(weight_sum) : INFINITY;
}

// The grid is (columns, h_kv, row blocks of CombineShape::kRowsPerCta rows, looped over where they exceed the grid's
// z limit). A column is a sequence where the batch has at most as many sequences as the schedule has parts
// (by_sequence), else a part: the CTAs of part x combine the sequence whose second split starts that part
// (tile_metadata split_begin == 1), if any. Every sequence with more than one split has exactly one such part, so
// there are at most num_parts - 1 busy columns either way; a grid over the whole batch would spend most of its
// CTAs finding nothing to do (4096 CTAs for b 128, h_q 128, s_q 2).
// Launched as the decode's programmatic dependent (the default), it may start while the decode
// still runs: it reads only the schedule (written by kernels that finished before the decode began) until
// griddepcontrol.wait has seen the decode finish and its results become visible. Every thread waits, those with
// nothing to merge too, so this grid never finishes before the decode. Otherwise the wait returns at once.
// The launch bounds' minimum of 4 CTAs an SM caps it at 64 registers (kFloatsInFlight).
template <typename T, int kSlices>
__global__ void __launch_bounds__(kCombineWarps * 32, 4) combine_kernel(const DecodeParams p, bool by_sequence) {
  using Shape = CombineShape<kSlices>;
  const int head_kv = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int seq = blockIdx.x;
  if (!by_sequence) {
    const int32_t* md = p.tile_metadata + static_cast<size_t>(blockIdx.x) * kMetadataRowInts;
    seq = md[4] == 1 ? md[0] : -1;
  }
  const bool has_seq = seq >= 0 && seq < p.batch;
  const int first = has_seq ? p.num_splits[seq] : 0, next = has_seq ? p.num_splits[seq + 1] : 0;
#ifndef JFM_PROBE_COMBINE_NO_WAIT  // a probe build without the wait, to show test_dependent_combine_launch can fail
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  // One split was written straight to out; a range outside the buffers means metadata for other lengths.
  if (!has_seq || !several_splits_inside(first, next, p.batch + p.num_parts)) return;
  const int row_blocks = Shape::row_blocks(p.q_rows);
  for (int block = blockIdx.z; block < row_blocks; block += gridDim.z) {
    const int row = block * Shape::kRowsPerCta + warp / kSlices;
    if (row < p.q_rows) merge_row<T, kSlices>(p, seq, head_kv, row, warp % kSlices, lane, first, next - first);
  }
}

template <typename T, int kSlices>
cudaError_t launch_combine_typed(const DecodeParams& p, cudaStream_t stream, bool by_sequence) {
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  const int grid_rows = std::min(CombineShape<kSlices>::row_blocks(p.q_rows), kMaxGridYZ);
  config.gridDim = dim3(by_sequence ? p.batch : p.num_parts, p.h_kv, grid_rows);
  config.blockDim = dim3(kCombineWarps * 32);
  config.stream = stream;
  config.attrs = &dependent;
  config.numAttrs = environment_says("JAX_FLASHMLA_COMBINE", "separate") ? 0 : 1;
  return cudaLaunchKernelEx(&config, combine_kernel<T, kSlices>, p, by_sequence);
}

// How many warps share a query row: 4 where sequences have many splits each (batches of at most half the parts, such
// as b 8 with 132 parts: about 16 splits a sequence), 2 elsewhere. Measured on an H100 against one warp a row
// (benchmarks/NOTES.md, version 2.26): 4 slices took 0.4-18% off the b 8 rows and up to 3.2% onto b 128 ones, 2
// slices 0.2% or less either way on b 128's memory rows. JAX_FLASHMLA_COMBINE_SLICES=2 or 4 forces a count.
int combine_slices(const DecodeParams& p) {
  if (environment_says("JAX_FLASHMLA_COMBINE_SLICES", "2")) return 2;
  if (environment_says("JAX_FLASHMLA_COMBINE_SLICES", "4")) return 4;
  return 2 * static_cast<long long>(p.batch) <= p.num_parts ? 4 : 2;
}

template <typename T>
cudaError_t launch_combine_sliced(const DecodeParams& p, cudaStream_t stream) {
  const bool by_sequence = p.batch <= p.num_parts;
  switch (combine_slices(p)) {
    case 4: return launch_combine_typed<T, 4>(p, stream, by_sequence);
    default: return launch_combine_typed<T, 2>(p, stream, by_sequence);
  }
}

}  // namespace

// The combine is launched as a programmatic dependent of the decode before it in the stream (the narrow and seesaw
// kernels allow it at their start; the others when they exit): its launch and its reads of the schedule overlap
// the decode's end, 1-2 us a decode on the H100 (NOTES.md, version 2.21). JAX_FLASHMLA_COMBINE=separate launches
// it after the decode instead.
cudaError_t launch_combine(const DecodeParams& p, ElementType type, cudaStream_t stream) {
  if (p.head_dim_v != kHeadDimV || p.q_rows < 1 || p.h_kv < 1 || p.num_parts < 1 || p.batch < 1)
    return cudaErrorInvalidValue;
  const cudaError_t launched = type == ElementType::kBF16 ? launch_combine_sliced<__nv_bfloat16>(p, stream)
                                                          : launch_combine_sliced<__half>(p, stream);
  const cudaError_t last = cudaGetLastError();  // also clears a launch error, which the next launch would report
  return launched != cudaSuccess ? launched : last;
}

}  // namespace jax_flashmla
