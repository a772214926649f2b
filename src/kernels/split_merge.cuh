// Merging a sequence's split-KV partials inside a decode kernel, for a kernel whose CTA that stores the last
// partial merges them all (decode_narrow.cuh), so that no combine launch follows. The arithmetic, its order and
// the lane layout are combine.cu's, so the result is that kernel's, bit for bit.
#pragma once

#include <cmath>

#include "kernels/element.cuh"
#include "mla_params.h"

namespace jax_flashmla {

// Whether num_splits gives a sequence more than one split, [first, next), inside the partial buffers' slots
// [0, slots). The values may be anything (a schedule for other lengths, say), so nothing is computed from them
// before they are bounded: first + count or next - first could wrap around.
__device__ __forceinline__ bool several_splits_inside(int first, int next, int slots) {
  return first >= 0 && first <= slots && next <= slots && next >= first + 2;
}

// Rows row0 .. row0 + kRows - 1 (those below q_rows) of the head group (seq, head_kv), on one warp: the splits
// first .. first + count - 1, in index order, into out and lse. Lane l holds dims 8l .. 8l + 7 and 256 + 8l ..,
// as in combine.cu; all the rows' loads of a split go out before their FMAs. The caller checks that the splits
// lie inside o_accum and lse_accum (several_splits_inside), and makes the other CTAs' partials visible (a fence
// after their arrival).
template <typename T, int kRows>
__device__ __forceinline__ void merge_split_rows(const DecodeParams& p, int seq, int head_kv, int first, int count,
                                                 int row0, int lane) {
  constexpr int kHeadDimV = 512;
  const int group = p.h_q / p.h_kv;
  const size_t split_stride = static_cast<size_t>(p.h_kv) * p.q_rows;
  const size_t first_slot = (static_cast<size_t>(first) * p.h_kv + head_kv) * p.q_rows;
  bool real[kRows];
  float max_lse[kRows], weight_sum[kRows], o[kRows][16];
  // L2 loads (.cg): this SM's L1 may hold an older copy of a line another CTA has since written.
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    real[i] = row0 + i < p.q_rows;
    max_lse[i] = -INFINITY;
    weight_sum[i] = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) o[i][j] = 0.f;
    // Every lane takes the maximum over all the splits (combine.cu's lanes share the work; a maximum is exact in
    // any order). A loop bound that depends on the lane made ptxas serialize the narrow kernel's wgmmas (C7520).
    if (real[i])
#pragma unroll 4
      for (int t = 0; t < count; ++t)
        max_lse[i] = fmaxf(max_lse[i], __ldcg(p.lse_accum + first_slot + row0 + i + t * split_stride));
  }
#pragma unroll 1
  for (int t = 0; t < count; ++t) {
    float lse[kRows];
    float4 v[kRows][4];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (!real[i] || max_lse[i] == -INFINITY) continue;
      const size_t slot = first_slot + row0 + i + t * split_stride;
      const float4* part = reinterpret_cast<const float4*>(p.o_accum + slot * kHeadDimV);
      lse[i] = __ldcg(p.lse_accum + slot);
      v[i][0] = __ldcg(part + lane * 2), v[i][1] = __ldcg(part + lane * 2 + 1);
      v[i][2] = __ldcg(part + 64 + lane * 2), v[i][3] = __ldcg(part + 64 + lane * 2 + 1);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (!real[i] || max_lse[i] == -INFINITY) continue;
      const float w = expf(lse[i] - max_lse[i]);  // exp(-inf) = 0 for empty splits
      weight_sum[i] += w;
      const float* values = reinterpret_cast<const float*>(v[i]);
#pragma unroll
      for (int j = 0; j < 16; ++j) o[i][j] = fmaf(w, values[j], o[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (!real[i]) continue;
    const bool seen = weight_sum[i] > 0.f;
    const float inv = seen ? 1.f / weight_sum[i] : 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) o[i][j] *= inv;
    const int row = row0 + i, s_idx = row / group, head = head_kv * group + row % group;
    T* out = static_cast<T*>(p.out) + ((static_cast<size_t>(seq) * p.s_q + s_idx) * p.h_q + head) * kHeadDimV;
    *reinterpret_cast<uint4*>(out + lane * 8) = pack8<T>(&o[i][0]);
    *reinterpret_cast<uint4*>(out + 256 + lane * 8) = pack8<T>(&o[i][8]);
    if (lane == 0)
      p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s_idx] =
          seen ? max_lse[i] + logf(weight_sum[i]) : INFINITY;
  }
}

}  // namespace jax_flashmla
