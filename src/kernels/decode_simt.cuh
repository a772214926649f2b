// Split-KV MLA decode over a paged KV cache: the portable baseline kernel.
//
// One CTA serves 64 query rows of one KV head (rows r = s*g + j, see mla_params.h) for the part of the
// schedule grid_part() names, walking 64-token pages: S = Q K^T in fp32 FMAs from shared memory, an online
// softmax in base 2 with the scale folded in, O += P V with V the first 512 dims of the same K tile.
// Tokens past the sequence's length or on an invalid page are zero-filled in shared memory (pages may hold
// NaN there) and masked in S, so no stray value reaches the output and no address leaves its buffer.
#pragma once

#include <cfloat>
#include <cmath>

#include "kernels/element.cuh"
#include "kernels/part_walk.cuh"
#include "mla_params.h"

namespace jax_flashmla {
namespace simt {

constexpr int kThreads = 256;
constexpr int kBlockM = 64;
constexpr int kBlockN = kPageSize;
constexpr int kMaxHeadDim = 576;
constexpr int kHeadDimV = 512;
// Rows padded by one 16-byte vector: 73 vectors a row, odd, so 8 consecutive rows hit 8 different bank groups.
constexpr int kRowStride = kMaxHeadDim + 8;
constexpr int kScoreStride = kBlockN + 4;

struct SharedStorage {
  // 16-bit elements, stored as raw bits so one layout serves bf16 and fp16.
  uint16_t q[kBlockM * kRowStride];
  uint16_t k[kBlockN * kRowStride];
  float p[kBlockM * kScoreStride];  // scores, then probabilities, of the current tile
  float row_alpha[kBlockM];         // rescale factor of each row's accumulator for this tile
  float row_max[kBlockM];           // final running max (base-2, scaled) and sum, for the epilogue
  float row_sum[kBlockM];
};

template <typename T>
__device__ void load_q_tile(const DecodeParams& p, SharedStorage& s, int seq, int head_kv, int row0) {
  const int vecs_per_row = p.head_dim / 8;
  const int group = p.h_q / p.h_kv;
  for (int idx = threadIdx.x; idx < kBlockM * vecs_per_row; idx += kThreads) {
    const int r = idx / vecs_per_row, v = idx % vecs_per_row;
    const int row = row0 + r;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row < p.q_rows) {
      const int s_idx = row / group, head = head_kv * group + row % group;
      const size_t offset = ((static_cast<size_t>(seq) * p.s_q + s_idx) * p.h_q + head) * p.head_dim + v * 8;
      value = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + offset);
    }
    *reinterpret_cast<uint4*>(&s.q[r * kRowStride + v * 8]) = value;
  }
}

// Loads the 64 tokens of block `block` of sequence `seq`, zero-filling what must not be read; returns
// whether the block's page id is valid (tokens on an invalid page are masked out of S too).
// `pool` is the first element of the layer being read.
template <typename T>
__device__ bool load_kv_tile(const DecodeParams& p, const T* pool, SharedStorage& s, int seq, int head_kv, int block,
                             int length) {
  const int vecs_per_row = p.head_dim / 8;
  const int page = page_of(p, seq, block);
  const bool page_ok = page_in_pool(p, page);
  for (int idx = threadIdx.x; idx < kBlockN * vecs_per_row; idx += kThreads) {
    const int t = idx / vecs_per_row, v = idx % vecs_per_row;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (page_ok && block * kBlockN + t < length) {
      const size_t offset = ((static_cast<size_t>(page) * kPageSize + t) * p.h_kv + head_kv) * p.head_dim + v * 8;
      value = *reinterpret_cast<const uint4*>(pool + offset);
    }
    *reinterpret_cast<uint4*>(&s.k[t * kRowStride + v * 8]) = value;
  }
  return page_ok;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SharedStorage& s = *reinterpret_cast<SharedStorage*>(smem_raw);

  const int head_kv = blockIdx.y, row0 = grid_row_block() * kBlockM;
  const int tid = threadIdx.x;
  const int group = p.h_q / p.h_kv;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  // S-phase mapping: rows ty*4 + i, columns tx + 16*j (interleaved so a warp reads 16 different K rows).
  const int tx = tid % 16, ty = tid / 16;
  // PV-phase mapping: rows warp*8 + r, columns lane*8 + c and 256 + lane*8 + c.
  const int warp = tid / 32, lane = tid % 32;
  const T* pool = static_cast<const T*>(p.k_cache) +
                  static_cast<size_t>(pool_layer(p)) * p.num_pages * kPageSize * p.h_kv * p.head_dim;

  const PartWalk walk(p);
  for (int seq = walk.first; seq <= walk.last; ++seq) {
    const Chunk c = walk.chunk(p, seq);
    if (c.skip) continue;

    __syncthreads();  // the previous chunk's epilogue is done with shared memory
    load_q_tile<T>(p, s, seq, head_kv, row0);

    // Visible keys of each of this thread's S rows: [0, limit).
    int limit[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + ty * 4 + i;
      const int s_idx = row / group;
      limit[i] = row >= p.q_rows ? 0 : (p.causal ? c.length - p.s_q + s_idx + 1 : c.length);
    }
    float m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) m[i] = -INFINITY, l[i] = 0.f;
    float acc_o[8][16];
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int j = 0; j < 16; ++j) acc_o[r][j] = 0.f;

    for (int block = c.block_begin; block < c.block_end; ++block) {
      __syncthreads();  // previous tile's P V is done with s.k and s.p
      const bool page_ok = load_kv_tile<T>(p, pool, s, seq, head_kv, block, c.length);
      __syncthreads();

      // S = Q K^T for rows ty*4+i, columns tx+16j.
      float acc[4][4] = {};
      for (int d = 0; d < p.head_dim; d += 8) {
        float kf[4][8];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          unpack8<T>(*reinterpret_cast<const uint4*>(&s.k[(tx + 16 * j) * kRowStride + d]), kf[j]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float qf[8];
          unpack8<T>(*reinterpret_cast<const uint4*>(&s.q[(ty * 4 + i) * kRowStride + d]), qf);
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][j] = fmaf(qf[e], kf[j][e], acc[i][j]);
        }
      }

      // Online softmax, base 2: each row lives in the 16 lanes sharing ty.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int token = block * kBlockN + tx + 16 * j;
          acc[i][j] = page_ok && token < limit[i] ? acc[i][j] * scale_log2 : -INFINITY;
          tile_max = fmaxf(tile_max, acc[i][j]);
        }
#pragma unroll
        for (int offset = 8; offset > 0; offset /= 2)
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
        const float m_new = fmaxf(m[i], tile_max);
        // While a row has seen no key, m_new is -inf: keep its probabilities 0 instead of NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m[i] - m_use);
        float tile_sum = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float prob = exp2f(acc[i][j] - m_use);
          s.p[(ty * 4 + i) * kScoreStride + tx + 16 * j] = prob;
          tile_sum += prob;
        }
#pragma unroll
        for (int offset = 8; offset > 0; offset /= 2) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
        l[i] = l[i] * alpha + tile_sum;
        m[i] = m_new;
        if (tx == 0) s.row_alpha[ty * 4 + i] = alpha;
      }
      __syncthreads();

      // O = alpha * O + P V.
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        const float alpha = s.row_alpha[warp * 8 + r];
#pragma unroll
        for (int j = 0; j < 16; ++j) acc_o[r][j] *= alpha;
      }
      for (int n = 0; n < kBlockN; ++n) {
        float v[16];
        unpack8<T>(*reinterpret_cast<const uint4*>(&s.k[n * kRowStride + lane * 8]), &v[0]);
        unpack8<T>(*reinterpret_cast<const uint4*>(&s.k[n * kRowStride + 256 + lane * 8]), &v[8]);
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          const float prob = s.p[(warp * 8 + r) * kScoreStride + n];
#pragma unroll
          for (int j = 0; j < 16; ++j) acc_o[r][j] = fmaf(prob, v[j], acc_o[r][j]);
        }
      }
    }

    // Epilogue: hand each row's softmax state from the S mapping to the PV mapping.
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s.row_max[ty * 4 + i] = m[i], s.row_sum[ty * 4 + i] = l[i];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int local = warp * 8 + r, row = row0 + local;
      if (row >= p.q_rows) continue;
      const float sum = s.row_sum[local];
      const bool seen = sum > 0.f;
      const float inv = seen ? 1.f / sum : 0.f;
      // Natural-log LSE of the scaled scores; FlashMLA's +inf for a query that saw nothing.
      const float lse = seen ? (s.row_max[local] + log2f(sum)) * 0.6931471805599453f : INFINITY;
      const int s_idx = row / group, head = head_kv * group + row % group;
      float o[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) o[j] = acc_o[r][j] * inv;
      if (c.final_output) {
        T* out = static_cast<T*>(p.out) + ((static_cast<size_t>(seq) * p.s_q + s_idx) * p.h_q + head) * kHeadDimV;
        *reinterpret_cast<uint4*>(out + lane * 8) = pack8<T>(&o[0]);
        *reinterpret_cast<uint4*>(out + 256 + lane * 8) = pack8<T>(&o[8]);
        if (lane == 0) p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s_idx] = lse;
      } else {
        const size_t slot = (static_cast<size_t>(c.split) * p.h_kv + head_kv) * p.q_rows + row;
        float4* acc_out = reinterpret_cast<float4*>(p.o_accum + slot * kHeadDimV);
        acc_out[lane * 2] = make_float4(o[0], o[1], o[2], o[3]);
        acc_out[lane * 2 + 1] = make_float4(o[4], o[5], o[6], o[7]);
        acc_out[64 + lane * 2] = make_float4(o[8], o[9], o[10], o[11]);
        acc_out[64 + lane * 2 + 1] = make_float4(o[12], o[13], o[14], o[15]);
        if (lane == 0) p.lse_accum[slot] = seen ? lse : -INFINITY;  // -inf: this split adds nothing
      }
    }
  }
}

}  // namespace simt
}  // namespace jax_flashmla
