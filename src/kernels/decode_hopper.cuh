// Split-KV MLA decode over a paged KV cache: the single-softmax Hopper (sm_90a) kernel for d = 576, dv = 512.
// The seesaw kernel (decode_seesaw.cuh) is the default (with decode_narrow.cuh for narrow head groups); this one
// runs when JAX_FLASHMLA_DECODE_KERNEL=hopper, and its shared helpers (layouts, Q load, epilogue) serve both.
//
// One CTA serves 64 query rows of one KV head (rows r = s*g + j, see mla_params.h) and walks the 64-token
// pages of the part of the schedule grid_part() names (the grid has as many CTAs as SMs: persistent).
// Three warpgroups share the work:
//   producer   one thread issues the TMA loads of whole pages (nine 64x64 swizzled boxes) into a two-stage
//              ring, on mbarriers; KV is read exactly once per CTA.
//   consumer 1 S = Q K^T (wgmma, both operands in shared memory), the online softmax in base 2 with the
//              scale folded in, hands P (bf16/fp16) and the rescale factors to consumer 2 through shared
//              memory, then O[:, 0:256] += P V (wgmma, P from registers). It issues S of the next page
//              before waiting for its P V, so the tensor cores stay busy while it waits.
//   consumer 2 O[:, 256:512] += P V (wgmma, both operands in shared memory).
// V is the first 512 dims of the same K page, read through a transposed (MN-major) view of the same bytes.
// Tokens past the sequence's length or on an invalid page are zeroed in shared memory before any GEMM
// reads them (pages may hold NaN there) and masked in S; no load leaves its buffer.
#pragma once

#include <cuda.h>
#include <cfloat>
#include <cmath>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "kernels/element.cuh"
#include "kernels/part_walk.cuh"
#include "mla_params.h"

namespace jax_flashmla {
namespace hopper {

using namespace cute;

constexpr int kBlockM = 64;             // query rows per CTA
constexpr int kBlockN = kPageSize;      // tokens per page, one pipeline stage
constexpr int kHeadDim = 576;           // latent (512) + rope (64)
constexpr int kHeadDimV = 512;
constexpr int kHalfV = kHeadDimV / 2;   // each consumer warpgroup owns half of the output columns
constexpr int kStages = 2;
constexpr int kThreads = 384;           // producer + two consumers
constexpr int kChunkCols = 64;          // one 128-byte swizzle atom of 16-bit elements
constexpr int kNumChunks = kHeadDim / kChunkCols;
constexpr int kChunkBytes = kBlockN * kChunkCols * 2;  // 8 KiB: one TMA box
constexpr int kPageBytes = kNumChunks * kChunkBytes;   // 72 KiB

// Named barrier (id 0 is __syncthreads) for consumer 1 alone: its own shared-memory writes are done. The
// hand-off between the consumers uses mbarriers (SharedStorage::p_full/p_empty): arrive releases the
// writer's shared-memory accesses and the wait acquires them, and the writer need not wait for the reader.
constexpr int kBarConsumer1 = 1;

template <typename T>
struct CuteType;
template <>
struct CuteType<__nv_bfloat16> {
  using type = cute::bfloat16_t;
};
template <>
struct CuteType<__half> {
  using type = cute::half_t;
};

// Shared-memory layouts. Every 64x576 tile is nine 64x64 chunks of 8 KiB, each row 128 bytes with the
// hardware's 128-byte swizzle: what one TMA box with CU_TENSOR_MAP_SWIZZLE_128B writes.
template <typename E>
struct Layouts {
  using QK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using P = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  // V^T (dv x tokens) over the same bytes as K: dims contiguous inside a chunk, chunks 8 KiB apart.
  using VHalf = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<kHalfV>, Int<kBlockN>>{},
                                       Step<_2, _1>{}));
};

struct alignas(1024) SharedStorage {
  uint16_t q[kBlockM * kHeadDim];
  uint16_t kv[kStages][kBlockN * kHeadDim];
  uint16_t p[kBlockM * kBlockN];
  float row_scale[kBlockM];  // per tile: factor that rescales each row's accumulator
  float row_sum[kBlockM];    // at a chunk's last tile: each row's softmax denominator
  uint64_t full[kStages];
  uint64_t empty[kStages];
  uint64_t p_full;   // consumer 1 -> 2: P, rescale factors (and at a chunk's end, row sums) written
  uint64_t p_empty;  // consumer 2 -> 1: its P V is done reading P
};
constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;  // + slack to align the base to 1024 bytes

// Byte offset of element (row, col) of a K-major tile whose rows are 128 bytes (64 16-bit columns), with the
// 128-byte swizzle: the layout a TMA box with that swizzle writes, and wgmma's K-major SW128 operands read.
__host__ __device__ __forceinline__ int swizzled_row_offset(int row, int col) {
  return row * 128 + ((((col % kChunkCols) / 8) ^ (row % 8)) * 16) + (col % 8) * 2;
}

// Byte offset of element (row, col) in a tile of kRows-row swizzled chunks of 64 columns, one after the other.
template <int kRows>
__host__ __device__ __forceinline__ int swizzled_chunked_offset(int row, int col) {
  return (col / kChunkCols) * (kRows * 128) + swizzled_row_offset(row, col);
}

// Byte offset of element (row, col) in a tile of swizzled 64x64 chunks (a stage, or this kernel's Q).
__device__ __forceinline__ int swizzled_offset(int row, int col) {
  static_assert(kBlockM * 128 == kChunkBytes);
  return swizzled_chunked_offset<kBlockM>(row, col);
}

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Generic-proxy shared-memory writes become visible to the tensor cores and the copy engine.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Tokens of a block that hold data: 0 for an invalid page. The first form takes the block's page id, already
// read from the block table.
__device__ __forceinline__ int valid_tokens(const DecodeParams& p, const Chunk& c, int block, int page) {
  return page_in_pool(p, page) ? min(kBlockN, c.length - block * kBlockN) : 0;
}
__device__ __forceinline__ int valid_tokens(const DecodeParams& p, const Chunk& c, int block) {
  return valid_tokens(p, c, block, page_of(p, c.seq, block));
}

// The L2 policy of a KV page load: a page read by several CTAs (row blocks of the same part) should stay in L2
// for the others; one read by a single CTA need not.
__device__ __forceinline__ uint64_t kv_cache_hint() {
  return grid_row_blocks() > 1 ? static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL)
                               : static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_FIRST);
}

// ---------------------------------------------------------------------------------------------------------
// Producer: one thread streams pages into the ring.
__device__ __forceinline__ void produce(const DecodeParams& p, const CUtensorMap* kv_map, SharedStorage& s) {
  const int head_kv = blockIdx.y, layer = pool_layer(p);
  const uint64_t cache_hint = kv_cache_hint();
  int tile = 0;
  const PartWalk walk(p);
  for (int seq = walk.first; seq <= walk.last; ++seq) {
    const Chunk c = walk.chunk(p, seq);
    if (c.skip) continue;
    for (int block = c.block_begin; block < c.block_end; ++block, ++tile) {
      const int stage = tile % kStages;
      wait_barrier(s.empty[stage], ((tile / kStages) & 1) ^ 1);
      const int page = page_of(p, c.seq, block);
      if (page_in_pool(p, page)) {
        set_barrier_transaction_bytes(s.full[stage], kPageBytes);
#pragma unroll
        for (int chunk = 0; chunk < kNumChunks; ++chunk)
          SM90_TMA_LOAD_4D::copy(kv_map, &s.full[stage], cache_hint,
                                 reinterpret_cast<char*>(s.kv[stage]) + chunk * kChunkBytes, chunk * kChunkCols,
                                 head_kv, page * kPageSize, layer);
      } else {
        arrive_barrier(s.full[stage]);  // nothing to load: the consumers zero the stage
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Consumer helpers.

// Zeroes rows [first_row, 64) of a stage (all 576 dims) with the threads of one warpgroup.
__device__ __forceinline__ void zero_rows(uint16_t* stage, int first_row, int thread) {
  char* base = reinterpret_cast<char*>(stage);
  const int vecs = (kBlockN - first_row) * (kHeadDim / 8);
  for (int idx = thread; idx < vecs; idx += 128) {
    const int row = first_row + idx / (kHeadDim / 8), v = idx % (kHeadDim / 8);
    *reinterpret_cast<uint4*>(base + (v / 8) * kChunkBytes + row * 128 + (v % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
}

// cp.async copies of query rows [row0, row0 + kRows) of this CTA's head group, for sequence `seq`, to shared memory
// at `base`: row r's column col at byte offset_of(r, col); rows past q_rows are zero-filled. cp.async copies global
// to shared memory without registers, so all of a thread's 16-byte copies are in flight at once (a load-then-store
// loop waited one memory latency per row: about 13% of consumer 1's time per chunk). One warp per row at a time, so
// the row's address arithmetic is done once per row. The copies complete at the issuing thread's wait_q_load().
template <typename T, int kRows, int kRowUnroll, typename OffsetOf>
__device__ __forceinline__ void issue_q_rows(const DecodeParams& p, char* base, int row0, int seq, int thread,
                                             OffsetOf offset_of) {
  const int head_kv = blockIdx.y, group = p.h_q / p.h_kv;
  const int warp = thread / 32, lane = thread % 32;
  constexpr int kVecsPerRow = kHeadDim / 8;
#pragma unroll kRowUnroll
  for (int r = warp; r < kRows; r += 4) {
    const int row = row0 + r;
    const bool real = row < p.q_rows;
    const int s_idx = row / group, head = head_kv * group + row % group;
    const T* src = real ? static_cast<const T*>(p.q) + ((static_cast<size_t>(seq) * p.s_q + s_idx) * p.h_q + head) * kHeadDim
                        : static_cast<const T*>(p.q);  // not read: a source size of 0 zero-fills
#pragma unroll
    for (int v = lane; v < kVecsPerRow; v += 32) {
      const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(base + offset_of(r, v * 8)));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src + (real ? v * 8 : 0)),
                   "r"(real ? 16 : 0)
                   : "memory");
    }
  }
}

// Q rows of this CTA into s.q, swizzled like the pages. Storage: any shared storage with this kernel's `q` (the
// seesaw kernel's too).
template <typename T, typename Storage>
__device__ __forceinline__ void issue_q_load(const DecodeParams& p, Storage& s, int seq, int thread) {
  issue_q_rows<T, kBlockM, 4>(p, reinterpret_cast<char*>(s.q), grid_row_block() * kBlockM, seq, thread,
                              [](int r, int col) { return swizzled_offset(r, col); });
}

__device__ __forceinline__ void wait_q_load() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T, typename Storage>
__device__ __forceinline__ void load_q(const DecodeParams& p, Storage& s, int seq, int thread) {
  issue_q_load<T>(p, s, seq, thread);
  wait_q_load();
}

// The 16 32-bit words of a 64x64 16-bit tile that a thread holds as a wgmma A fragment (or converts from a C
// fragment): word j is (row 16*warp + lane/4 + 8*(j%2), columns 8*(j/2) + 2*(lane%4) + {0, 1}).
__device__ __forceinline__ int fragment_word_offset(int j, int thread) {
  const int warp = thread / 32, lane = thread % 32;
  return swizzled_offset(warp * 16 + lane / 4 + 8 * (j % 2), 8 * (j / 2) + 2 * (lane % 4));
}

// Stores a thread's 16 words of a tile (fragment_word_offset's layout) with four stmatrix.x4: words 4k..4k+3
// are the 8x8 matrices at rows 8 * (j % 2) and columns 8 * (j / 2) of the warp's 16 rows, and lane 8i + r gives
// the address of row r of matrix i, 16 contiguous bytes of a swizzled chunk. A quarter of the instructions of
// 32-bit stores, with fewer bank conflicts (benchmarks/NOTES.md).
template <typename Words>
__device__ __forceinline__ void store_tile_words(uint16_t* tile, const Words& words, int thread) {
  const int warp = thread / 32, lane = thread % 32, i = lane / 8, r = lane % 8;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t row_address = base + swizzled_offset(16 * warp + 8 * (i % 2) + r, 8 * (2 * k + i / 2));
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(row_address),
                 "r"(words(4 * k)), "r"(words(4 * k + 1)), "r"(words(4 * k + 2)), "r"(words(4 * k + 3))
                 : "memory");
  }
}

template <typename T, typename Acc, typename Words>
__device__ __forceinline__ void pack_words(const Acc& acc, Words& words) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const auto pair = Element<T>::from_float2(acc(2 * j), acc(2 * j + 1));
    words(j) = reinterpret_cast<const uint32_t&>(pair);
  }
}

// acc *= factor per row (C fragment: value v belongs to row half (v / 2) % 2). Once the running maxima settle
// every factor is 1: the 128 multiplies per thread are skipped when they are for all of the warp's rows.
template <typename Acc>
__device__ __forceinline__ void rescale_rows(Acc& acc, const float factor[2]) {
  if (__all_sync(0xffffffffu, factor[0] == 1.f && factor[1] == 1.f)) return;
#pragma unroll
  for (int v = 0; v < size(acc); ++v) acc(v) *= factor[(v / 2) % 2];
}

template <bool kZeroInit, typename Mma, typename FragA, typename FragB, typename FragC>
__device__ __forceinline__ void issue_gemm(Mma& mma, const FragA& a, const FragB& b, FragC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
}

// Transposes the 4x4 matrix of words the lanes of a quad hold (lane q: row q, w[j] = element (q, j)): afterwards
// lane q holds column q (w[i] = element (i, q)). Two butterfly steps; in each a lane keeps the half of its words
// whose index agrees with its own lane bit and trades the other half with its partner.
__device__ __forceinline__ void transpose_quad(uint32_t (&w)[4]) {
  const int quad_lane = threadIdx.x % 4;
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    const int bit = 1 << step;
    const bool upper = quad_lane & bit;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j & bit) continue;
      const uint32_t traded = __shfl_xor_sync(0xffffffffu, upper ? w[j] : w[j | bit], bit);
      if (upper)
        w[j] = traded;
      else
        w[j | bit] = traded;
    }
  }
}

// Writes this warpgroup's half of the output rows: out/lse directly, or the split's partial.
// acc holds the C fragment of a 64x256 tile (value v: column 8*(v/4) + 2*(lane%4) + v%2, row + 8*((v/2)%2)), so
// a lane holds 2 adjacent columns of each 8-column group. A transpose in each quad gives each lane all 8 columns
// of one group in four: one 16-byte store for out (64 STG.32 per thread become 16; a quad writes 64 contiguous
// bytes of a row), two for the float32 partial (64 STG.64 become 32; together a lane's whole 32-byte sector).
template <typename T, typename Acc>
__device__ __forceinline__ void store_output(const DecodeParams& p, const Chunk& c, const Acc& acc, int col0,
                                             const float inv_sum[2], int thread) {
  const int head_kv = blockIdx.y, row0 = grid_row_block() * kBlockM;
  const int group = p.h_q / p.h_kv;
  const int warp = thread / 32, lane = thread % 32;
  // The accumulators are read on every thread and only the stores are predicated: reading wgmma
  // accumulators on a divergent path makes ptxas serialize every wgmma of the kernel.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + warp * 16 + lane / 4 + 8 * h;
    const bool real = row < p.q_rows;
    const int safe_row = real ? row : 0;
    const int s_idx = safe_row / group, head = head_kv * group + safe_row % group;
    T* out = static_cast<T*>(p.out) + ((static_cast<size_t>(c.seq) * p.s_q + s_idx) * p.h_q + head) * kHeadDimV;
    // c.split is range-checked only where the chunk stores a partial: no pointer is formed from it elsewhere.
    const size_t split = c.final_output ? 0 : static_cast<size_t>(c.split);
    float* partial = p.o_accum + ((split * p.h_kv + head_kv) * p.q_rows + safe_row) * kHeadDimV;
#pragma unroll
    for (int quad_group = 0; quad_group < kHalfV / 32; ++quad_group) {
      // Groups 4*quad_group + j; afterwards this lane's is 4*quad_group + lane % 4, columns 2i and 2i+1 in
      // even[i], odd[i].
      uint32_t even[4], odd[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int v = (4 * quad_group + j) * 4 + 2 * h;
        even[j] = __float_as_uint(acc(v) * inv_sum[h]);
        odd[j] = __float_as_uint(acc(v + 1) * inv_sum[h]);
      }
      transpose_quad(even);
      transpose_quad(odd);
      const int col = col0 + 8 * (4 * quad_group + lane % 4);
      if (real && c.final_output) {
        uint32_t packed[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const auto pair = Element<T>::from_float2(__uint_as_float(even[i]), __uint_as_float(odd[i]));
          packed[i] = reinterpret_cast<const uint32_t&>(pair);
        }
        *reinterpret_cast<uint4*>(out + col) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      }
      if (real && !c.final_output) {
        *reinterpret_cast<uint4*>(partial + col) = make_uint4(even[0], odd[0], even[1], odd[1]);
        *reinterpret_cast<uint4*>(partial + col + 4) = make_uint4(even[2], odd[2], even[3], odd[3]);
      }
    }
  }
}

// Writes the LSE of query row `row` (< q_rows) of this CTA's head group: the natural log of the row's sum of
// exp(scaled score), from its maximum m (base 2, scaled) and its sum. FlashMLA's +inf for a query that saw
// nothing; -inf in a split's partial, where it means "adds nothing".
__device__ __forceinline__ void store_row_lse(const DecodeParams& p, const Chunk& c, int row, float m, float sum,
                                              int group) {
  const int head_kv = blockIdx.y;
  const bool seen = sum > 0.f;
  const float lse = seen ? (m + log2f(sum)) * 0.6931471805599453f : INFINITY;
  if (c.final_output) {
    const int s_idx = row / group, head = head_kv * group + row % group;
    p.lse[(static_cast<size_t>(c.seq) * p.h_q + head) * p.s_q + s_idx] = lse;
  } else {
    const size_t slot = (static_cast<size_t>(c.split) * p.h_kv + head_kv) * p.q_rows + row;
    p.lse_accum[slot] = seen ? lse : -INFINITY;
  }
}

// The LSE of a thread's two rows (lane % 4 == 0 writes for its quad).
__device__ __forceinline__ void store_lse(const DecodeParams& p, const Chunk& c, const float m[2], const float sum[2],
                                          int row0, int group, int warp, int lane) {
  if (lane % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp * 16 + lane / 4 + 8 * h;
      if (row < p.q_rows) store_row_lse(p, c, row, m[h], sum[h], group);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Consumer 1: S, softmax, P, left half of O.
template <typename T>
__device__ __forceinline__ void consume_scores(const DecodeParams& p, SharedStorage& s) {
  using E = typename CuteType<T>::type;
  const int thread = threadIdx.x - 128;
  const int warp = thread / 32, lane = thread % 32;
  const int row0 = grid_row_block() * kBlockM;
  const int group = p.h_q / p.h_kv;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  auto mma_s = make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>>());
  auto mma_pv = make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<Int<kBlockM>, Int<kHalfV>, Int<kBlockN>>, GMMA::Major::K, GMMA::Major::MN>());
  auto thr_s = mma_s.get_thread_slice(thread);
  auto thr_pv = mma_pv.get_thread_slice(thread);

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.q)), typename Layouts<E>::QK{});
  Tensor sP = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.p)), typename Layouts<E>::P{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHalfV>>{});
  Tensor tOrP = thr_pv.partition_fragment_A(sP);  // registers: P as the A operand
  Tensor tOrP_words = recast<uint32_t>(tOrP);
  static_assert(decltype(size(tSrS))::value == 32 && decltype(size(tOrP))::value == 32);

  auto stage_k = [&](int stage) {
    return make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.kv[stage])), typename Layouts<E>::QK{});
  };
  auto stage_v = [&](int stage) {
    return make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.kv[stage])), typename Layouts<E>::VHalf{});
  };
  // Waits for a page, zeroes its rows past the valid tokens, and issues S = Q K^T on it.
  auto start_scores = [&](int tile, int valid) {
    const int stage = tile % kStages;
    wait_barrier(s.full[stage], (tile / kStages) & 1);
    if (valid < kBlockN) {
      zero_rows(s.kv[stage], valid, thread);
      fence_async_shared();
      named_sync(kBarConsumer1, 128);
    }
    Tensor tSrK = thr_s.partition_fragment_B(stage_k(stage));
    issue_gemm<true>(mma_s, tSrQ, tSrK, tSrS);
  };

  int tile = 0;
  const PartWalk walk(p);
  for (int seq = walk.first; seq <= walk.last; ++seq) {
    const Chunk c = walk.chunk(p, seq);
    if (c.skip) continue;
    const int n_tiles = c.block_end - c.block_begin;
    // Visible keys of this thread's two rows: [0, limit).
    int limit[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp * 16 + lane / 4 + 8 * h;
      limit[h] = row >= p.q_rows ? 0 : (p.causal ? c.length - p.s_q + row / group + 1 : c.length);
    }
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    clear(tOrO);

    load_q<T>(p, s, c.seq, thread);  // this warpgroup's earlier GEMMs on s.q are complete
    fence_async_shared();
    named_sync(kBarConsumer1, 128);

    int valid = n_tiles > 0 ? valid_tokens(p, c, c.block_begin) : 0;
    if (n_tiles > 0) {
      start_scores(tile, valid);
      warpgroup_wait<0>();
    }
    for (int i = 0; i < n_tiles; ++i, ++tile) {
      const int block = c.block_begin + i, stage = tile % kStages;
      const bool last = i + 1 == n_tiles;
      // The next page's block-table entry, loaded now so its latency hides behind the softmax.
      const int next_valid = last ? 0 : valid_tokens(p, c, block + 1);
      // Online softmax on S (rows 16*warp + lane/4 + 8h, columns 8*(v/4) + 2*(lane%4) + v%2), in base 2 with
      // the scale folded into one FFMA per score (softmax_scale > 0, so the raw maximum is the scaled one).
      // Keys at columns >= visible[h] are masked: one compare and one select per score, against a per-row
      // limit computed once per page.
      int visible[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) visible[h] = min(valid, limit[h] - block * kBlockN) - 2 * (lane % 4);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int g = 0; g < kBlockN / 8; ++g)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int v = 4 * g + 2 * h + e;
            tSrS(v) = 8 * g + e < visible[h] ? tSrS(v) : -INFINITY;
          }
      float scale[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int g = 0; g < kBlockN / 8; ++g)
#pragma unroll
          for (int e = 0; e < 2; ++e) tile_max = fmaxf(tile_max, tSrS(4 * g + 2 * h + e));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float m_new = fmaxf(row_max[h], tile_max * scale_log2);
        // While a row has seen no key, m_new is -inf: keep its probabilities 0 instead of NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        scale[h] = exp2f(row_max[h] - m_use);
        float tile_sum = 0.f;
#pragma unroll
        for (int g = 0; g < kBlockN / 8; ++g)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int v = 4 * g + 2 * h + e;
            tSrS(v) = exp2f(fmaf(tSrS(v), scale_log2, -m_use));
            tile_sum += tSrS(v);
          }
        row_sum[h] = row_sum[h] * scale[h] + tile_sum;
        row_max[h] = m_new;
      }
      float total_sum[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        total_sum[h] = row_sum[h];
        total_sum[h] += __shfl_xor_sync(0xffffffffu, total_sum[h], 1);
        total_sum[h] += __shfl_xor_sync(0xffffffffu, total_sum[h], 2);
      }
      // P in registers: the C layout of two adjacent 8-column groups is the A layout of a 16-deep slice,
      // so value v of S is value v of P. Pairs (v, v+1) are adjacent columns: one 32-bit word.
      pack_words<T>(tSrS, tOrP_words);

      // Hand P and the factors to consumer 2, once its previous P V is done reading s.p (phase tile - 1).
      if (tile > 0) wait_barrier(s.p_empty, (tile - 1) & 1);
      store_tile_words(s.p, tOrP_words, thread);
      if (lane % 4 == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp * 16 + lane / 4 + 8 * h;
          s.row_scale[row] = scale[h];
          if (last) s.row_sum[row] = total_sum[h];
        }
      }
      fence_async_shared();
      arrive_barrier(s.p_full);

      // O_left = scale * O_left + P V_left.
      rescale_rows(tOrO, scale);
      Tensor tOrV = thr_pv.partition_fragment_B(stage_v(stage));
      warpgroup_fence_operand(tOrP_words);
      issue_gemm<false>(mma_pv, tOrP, tOrV, tOrO);
      warpgroup_fence_operand(tOrP_words);  // P's registers are read by the tensor cores until the wait

      if (!last) {  // S of the next page runs on the tensor cores while this P V finishes
        valid = next_valid;
        start_scores(tile + 1, valid);
        warpgroup_wait<1>();
        arrive_barrier(s.empty[stage]);
        warpgroup_wait<0>();
      } else {
        warpgroup_wait<0>();
        arrive_barrier(s.empty[stage]);
      }
      if (last) {
        row_sum[0] = total_sum[0];
        row_sum[1] = total_sum[1];
      }
    }

    // Epilogue: normalise, write O_left and the LSE.
    float inv_sum[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) inv_sum[h] = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    store_output<T>(p, c, tOrO, 0, inv_sum, thread);
    store_lse(p, c, row_max, row_sum, row0, group, warp, lane);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Consumer 2: right half of O.
template <typename T>
__device__ __forceinline__ void consume_values(const DecodeParams& p, SharedStorage& s) {
  using E = typename CuteType<T>::type;
  const int thread = threadIdx.x - 256;
  const int warp = thread / 32, lane = thread % 32;

  auto mma_pv = make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<Int<kBlockM>, Int<kHalfV>, Int<kBlockN>>, GMMA::Major::K, GMMA::Major::MN>());
  auto thr_pv = mma_pv.get_thread_slice(thread);
  Tensor sP = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.p)), typename Layouts<E>::P{});
  Tensor tOrP = thr_pv.partition_fragment_A(sP);
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHalfV>>{});

  int tile = 0;
  const PartWalk walk(p);
  for (int seq = walk.first; seq <= walk.last; ++seq) {
    const Chunk c = walk.chunk(p, seq);
    if (c.skip) continue;
    const int n_tiles = c.block_end - c.block_begin;
    clear(tOrO);
    float row_sum[2] = {0.f, 0.f};
    for (int i = 0; i < n_tiles; ++i, ++tile) {
      const int stage = tile % kStages;
      wait_barrier(s.full[stage], (tile / kStages) & 1);  // the page's bytes, through the async proxy
      wait_barrier(s.p_full, tile & 1);
      float scale[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp * 16 + lane / 4 + 8 * h;
        scale[h] = s.row_scale[row];
        if (i + 1 == n_tiles) row_sum[h] = s.row_sum[row];
      }
      rescale_rows(tOrO, scale);
      Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.kv[stage]) + kHalfV * kBlockN),
                              typename Layouts<E>::VHalf{});
      Tensor tOrV = thr_pv.partition_fragment_B(sV);
      issue_gemm<false>(mma_pv, tOrP, tOrV, tOrO);
      warpgroup_wait<0>();
      arrive_barrier(s.p_empty);
      arrive_barrier(s.empty[stage]);
    }
    float inv_sum[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) inv_sum[h] = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    store_output<T>(p, c, tOrO, kHalfV, inv_sum, thread);
  }
}

// The dynamic shared memory as Storage, aligned to 1024 bytes (the 128-byte swizzle's repeat).
// The pointer stays `raw` plus an offset: rounding the address as an integer would hide that it points into
// shared memory, and every access through it would compile to a slower generic LD/ST instead of LDS/STS.
template <typename Storage>
__device__ __forceinline__ Storage& aligned_shared_storage(char* raw) {
  const uint32_t misalignment = static_cast<uint32_t>(__cvta_generic_to_shared(raw)) % 1024;
  return *reinterpret_cast<Storage*>(raw + (1024 - misalignment) % 1024);
}

// This thread's warpgroup, broadcast from lane 0 so the compiler knows the role is warp-uniform (else it
// serializes the wgmmas).
__device__ __forceinline__ int warp_uniform_warpgroup() {
  return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);
}

// Lets the combine kernel, when it is launched as this grid's programmatic dependent
// (the default, combine.cu), be scheduled before this grid ends: its launch latency and its
// reads of the schedule then overlap the decode's last CTAs, and it waits for the decode's results with
// griddepcontrol.wait. Called once per CTA at its start: the dependent launches only once every CTA of this grid
// has called it (or exited), and all of a persistent grid's CTAs are resident from the start. Without a dependent
// launch it does nothing.
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const DecodeParams p, const __grid_constant__ CUtensorMap kv_map) {
  extern __shared__ char smem_raw[];
  SharedStorage& s = aligned_shared_storage<SharedStorage>(smem_raw);
  const int warpgroup = warp_uniform_warpgroup();

  if (threadIdx.x == 0) {
#pragma unroll
    for (int stage = 0; stage < kStages; ++stage) {
      initialize_barrier(s.full[stage], 1);
      initialize_barrier(s.empty[stage], 256);  // every consumer thread arrives once it is done with a page
    }
    initialize_barrier(s.p_full, 128);
    initialize_barrier(s.p_empty, 128);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (threadIdx.x == 0) produce(p, &kv_map, s);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    if (warpgroup == 1)
      consume_scores<T>(p, s);
    else
      consume_values<T>(p, s);
  }
}

}  // namespace hopper
}  // namespace jax_flashmla
