// Split-KV MLA decode, Hopper (sm_90a), d = 576, dv = 512, for head groups of at most 32 query rows (the
// memory-bound shapes: s_q * h_q / h_kv <= 32). The default there on Hopper; JAX_FLASHMLA_DECODE_KERNEL=seesaw
// runs the seesaw instead (decode_launch.cuh).
//
// Why: the seesaw kernel (decode_seesaw.cuh) puts the query rows in wgmma's M, which is at least 64, so on a head
// group of 16 rows three quarters of its tensor work multiplies zero rows, and the pages wait in shared memory
// for it (benchmarks/NOTES.md, version 2.11). Here the page's 64 tokens are M and the kN query rows are N:
//   S^T (64 x kN)  = K (64 x 576) Q^T             m64nKNk16, K from the page, Q K-major, both shared memory
//   O^T (512 x kN) += V^T (512 x 64) P^T (64 x kN) eight m64nKNk16 blocks, V^T an MN-major view of the page's
//                                                  dims 0-511, P^T written by stmatrix.trans
// Each tensor instruction then reads a 64x16 tile of the page once, and the query side is only kN wide.
// The softmax runs over M: a row's 64 scores lie in four warps, so each page's row maxima meet in shared
// memory (one warpgroup barrier). The row sums stay per thread until the chunk's end.
//
// The page stream: a producer warp (lane 0) walks the same chunks as the consumer and loads each page as
// nine 64x64 tiles (the rope dims first) into a ring of kSlots 8 KiB slots, one full/empty mbarrier pair per
// slot. Since every tensor instruction reads one tile, a slot is freed as soon as its page no longer needs it:
// the rope tile after S, the other eight after P V. The ring holds two pages (18 slots; more loads in flight
// were slower, NOTES.md version 2.21), and the producer asks for a page's nine tiles at once, as soon as the ring
// has room for all of them; the seesaw holds two whole stages.
//
// The consumer warpgroup, per page n: waits S(n); frees the rope tile; masks, row maxima (the exchange), P;
// writes P^T; zeroes the page's rows past its valid tokens (they may hold NaN, and P V multiplies them by 0);
// rescales O^T; issues P V(n), waits for it and frees the page's other tiles; issues S(n+1). After a chunk's
// last S it issues the next chunk's Q (cp.async), which then lands behind the last P V and the epilogue.
// A split's partial goes to o_accum, and the combine kernel (combine.cu) merges a sequence's partials.
#pragma once

#include "kernels/decode_hopper.cuh"
#include "kernels/narrow_stalls.cuh"

namespace jax_flashmla {
namespace narrow {

using namespace cute;
using hopper::CuteType;
using hopper::kBlockN;
using hopper::kChunkBytes;
using hopper::kChunkCols;
using hopper::kHeadDim;
using hopper::kHeadDimV;
using hopper::kNumChunks;

constexpr int kConsumerThreads = 128;
constexpr int kThreads = kConsumerThreads + 32;  // + the producer warp
constexpr int kTilesPerPage = kNumChunks;        // 9: the rope tile, then dims 0-511 in eight tiles
constexpr int kVTiles = kTilesPerPage - 1;
constexpr int kTileElems = kBlockN * kChunkCols;
constexpr int kBarConsumer = 1;  // named barrier of the consumer warpgroup
constexpr int kSmemLimit = 227 * 1024;
#ifndef JFM_NARROW_RING_SLOTS  // the ring's depth in 64x64 tiles (capped at what fits); 18 = two pages
#define JFM_NARROW_RING_SLOTS 18
#endif
#ifndef JFM_NARROW_LOAD_BURST  // tiles the producer asks for at once; 1 = each as its slot frees, 9 = a page
#define JFM_NARROW_LOAD_BURST 9
#endif
constexpr int kLoadBurst = JFM_NARROW_LOAD_BURST;

// The dims tile that a page's i-th tile in the ring holds: the rope tile (8) first, since S frees it first.
__device__ __forceinline__ int dims_tile(int i) { return i == 0 ? kNumChunks - 1 : i - 1; }

template <int kN>
struct Storage {
  static constexpr int kQBytes = kN * kHeadDim * 2;
  static constexpr int kPBytes = kN * kBlockN * 2;
  static constexpr int kFixedBytes = kQBytes + kPBytes + (2 * 4 * kN + 2 * 4 * kN) * 4 + 1024 /* alignment */;
  static constexpr int kFitSlots = (kSmemLimit - kFixedBytes) / (kChunkBytes + 2 * 8);
  // Two pages of tiles, not all that fit (25 at 16 rows): with each page asked for in one burst (kLoadBurst), a
  // shallower ring was 0.5-1.5% faster on the H100 (NOTES.md, version 2.21). JFM_NARROW_RING_SLOTS overrides it.
  static constexpr int kWantedSlots = JFM_NARROW_RING_SLOTS;
  static constexpr int kSlots = kWantedSlots < kFitSlots ? kWantedSlots : kFitSlots;
};

template <int kN>
struct alignas(1024) SharedStorage {
  static constexpr int kSlots = Storage<kN>::kSlots;
  uint16_t ring[kSlots][kTileElems];  // 8 KiB slots, each one 64x64 TMA box (128-byte swizzle)
  uint16_t q[kN * kHeadDim];          // nine kN x 64 tiles, K-major, 128-byte swizzle
  uint16_t p[kN * kBlockN];           // P (kN x 64 tokens), K-major: P^T as wgmma's B
  float max_part[2][4][kN];           // each warp's row maxima over its 16 tokens, by page parity
  float sum_part[2][4][kN];           // each warp's row sums at a chunk's end, by chunk parity
  uint64_t full[kSlots];              // the slot holds its tile (or was skipped: a page outside the pool)
  uint64_t empty[kSlots];             // the consumer's four warps are done with the slot
};

template <int kN>
constexpr int smem_bytes() {
  return sizeof(SharedStorage<kN>) + 1024;
}
static_assert(smem_bytes<16>() <= kSmemLimit && smem_bytes<32>() <= kSmemLimit);
static_assert(SharedStorage<16>::kSlots >= 2 * kTilesPerPage && SharedStorage<32>::kSlots >= 2 * kTilesPerPage,
              "the ring holds at least two pages, so that the next one loads while one is computed");

template <typename E, int kN>
struct Layouts {
  // A page tile as S's A operand: 64 tokens x 64 dims, dims contiguous.
  using KTile = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kBlockN>, Int<kChunkCols>>{}));
  // The same bytes as P V's A operand: 64 dims x 64 tokens, dims contiguous (MN-major).
  using VTile = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<kChunkCols>, Int<kBlockN>>{}));
  // One of Q's nine 64-dim tiles as S's B operand (q_byte_offset places them), and P as P V's B operand.
  using QTile = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kN>, Int<kChunkCols>>{}));
  using P = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kN>, Int<kBlockN>>{}));
};

// Layouts::P and each of Layouts::QTile's tiles hold hopper::swizzled_row_offset's bytes (tests/host/
// narrow_layouts.cu checks that against CuTe's layouts).
using hopper::swizzled_row_offset;

// Byte offset of Q's element (row, col) in s.q: nine tiles of kN rows x 64 columns, one after the other.
template <int kN>
__host__ __device__ __forceinline__ int q_byte_offset(int row, int col) {
  return hopper::swizzled_chunked_offset<kN>(row, col);
}

// Where a page's tiles sit in the ring: its first tile's slot and that slot's phase. The next eight follow,
// wrapping around.
template <int kSlots>
struct RingPosition {
  int slot = 0;
  uint32_t phase = 0;

  __device__ __forceinline__ int slot_of(int i, uint32_t& phase_of) const {
    int at = slot + i;
    phase_of = phase;
    if (at >= kSlots) at -= kSlots, phase_of ^= 1;
    return at;
  }
  __device__ __forceinline__ RingPosition next_page() const {
    RingPosition r = *this;
    r.slot += kTilesPerPage;
    if (r.slot >= kSlots) r.slot -= kSlots, r.phase ^= 1;
    return r;
  }
};

// ---------------------------------------------------------------------------------------------------------
// The producer warp: lane 0 loads every page of the part's chunks, a burst of tiles (default: the page) at a time,
// each burst once the ring has freed all its slots.
template <int kN>
__device__ __forceinline__ void produce(const DecodeParams& p, const CUtensorMap* kv_map, SharedStorage<kN>& s) {
  constexpr int kSlots = SharedStorage<kN>::kSlots;
  if (threadIdx.x % 32 != 0) return;
  const int head_kv = blockIdx.y, layer = pool_layer(p);
  const uint64_t hint = hopper::kv_cache_hint();
  int slot = 0;
  uint32_t phase = 0;
#ifdef JFM_NARROW_STALLS
  long long ring_full = 0;
#endif
  const PartWalk walk(p);
  for (int seq = walk.first; seq <= walk.last; ++seq) {
    const Chunk c = walk.chunk(p, seq);
    if (c.skip) continue;
    for (int block = c.block_begin; block < c.block_end; ++block) {
      const int page = page_of(p, c.seq, block);
      const bool in_pool = page_in_pool(p, page);
#pragma unroll 1
      for (int i = 0; i < kTilesPerPage; ++i) {
        // A page's tiles go out in bursts of kLoadBurst (default: the whole page), each once the ring has room
        // for all of it, not one by one as slots free (NOTES.md, versions 2.15 and 2.21).
        // The burst's last slot held the tile kSlots - burst + 1 before the burst's first one; the consumer frees
        // it once it has that tile's whole page, which the producer must have issued already.
        static_assert(kLoadBurst >= 1 &&
                      kSlots >= (kLoadBurst < kTilesPerPage ? kLoadBurst : kTilesPerPage) + kTilesPerPage - 1,
                      "the ring must hold a burst and the rest of the page before it, or the wait deadlocks");
        if (kLoadBurst > 1 && i % kLoadBurst == 0) {
          // The consumer frees slots in ring order, so once the burst's last slot is free, all of it is.
          const int burst = i + kLoadBurst < kTilesPerPage ? kLoadBurst : kTilesPerPage - i;
          int last = slot + burst - 1;
          uint32_t last_phase = phase;
          if (last >= kSlots) last -= kSlots, last_phase ^= 1;
          JFM_TIMED(ring_full, wait_barrier(s.empty[last], last_phase ^ 1));
        }
        // A fresh barrier's "previous" phase counts as complete.
        JFM_TIMED(ring_full, wait_barrier(s.empty[slot], phase ^ 1));
        if (in_pool) {
          set_barrier_transaction_bytes(s.full[slot], kChunkBytes);
          SM90_TMA_LOAD_4D::copy(kv_map, &s.full[slot], hint, reinterpret_cast<char*>(s.ring[slot]),
                                 dims_tile(i) * kChunkCols, head_kv, page * kPageSize, layer);
        } else {
          arrive_barrier(s.full[slot]);  // nothing to load: the consumer masks the page and zeroes its V rows
        }
        if (++slot == kSlots) slot = 0, phase ^= 1;
      }
    }
  }
#ifdef JFM_PDL_LATE_TRIGGER  // an experiment (NOTES.md, version 2.15): the dependent combine released once every
                             // page is asked for, a few pages before the CTA ends, instead of at its start
  hopper::allow_dependent_launch();
#endif
#ifdef JFM_NARROW_STALLS
  add_stall(kRingFull, ring_full);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// The consumer warpgroup.

// Q's kN rows of this head group into s.q (nine kN x 64 tiles); rows past q_rows are zero-filled. Completes at
// hopper::wait_q_load().
template <typename T, int kN>
__device__ __forceinline__ void issue_q_load(const DecodeParams& p, SharedStorage<kN>& s, int seq, int thread) {
  hopper::issue_q_rows<T, kN, 1>(p, reinterpret_cast<char*>(s.q), 0, seq, thread, [](int r, int col) {
    return q_byte_offset<kN>(r, col);
  });
}

// A thread's part of an S^T or O^T accumulator (m64nKN C fragment): value v is M row
// 16 * warp + lane / 4 + 8 * ((v / 2) % 2) and N column 8 * (v / 4) + 2 * (lane % 4) + v % 2. The thread's
// kN / 4 distinct columns are numbered j = 2 * (v / 4) + v % 2.
__host__ __device__ __forceinline__ int fragment_m(int v, int lane, int warp) {
  return 16 * warp + lane / 4 + 8 * ((v / 2) % 2);
}
__host__ __device__ __forceinline__ int fragment_column(int j, int lane) {
  return 8 * (j / 2) + 2 * (lane % 4) + j % 2;
}
__host__ __device__ __forceinline__ int column_index(int v) { return 2 * (v / 4) + v % 2; }

// The byte offset in s.p that lane `lane` of `warp` gives store_p's stmatrix k (query rows 16k..16k+15): where
// row r of its matrix i = lane / 8 (r = lane % 8) goes.
__host__ __device__ __forceinline__ int p_row_address(int k, int lane, int warp) {
  const int i = lane / 8, r = lane % 8;
  return swizzled_row_offset(16 * k + 8 * (i / 2) + r, 16 * warp + 8 * (i % 2));
}

// Writes P (the scores' exponentials, in tS's registers as S^T) to s.p as P, K-major, with stmatrix.trans:
// 32-bit word u of a thread packs values 2u and 2u + 1, so words 4k..4k+3 are the 8x8 matrices (tokens
// 8 * (u % 2).., columns 8 * (u / 2)..) of the warp's 16 tokens, and .trans stores each matrix's column r (one
// query row, 8 tokens) as the 16 contiguous bytes that lane 8i + r addresses (p_row_address).
template <typename T, int kN, typename Acc>
__device__ __forceinline__ void store_p(SharedStorage<kN>& s, const Acc& acc, int thread) {
  const int warp = thread / 32, lane = thread % 32;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(s.p));
#pragma unroll
  for (int k = 0; k < kN / 16; ++k) {
    uint32_t w[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int u = 4 * k + m;
      const auto pair = Element<T>::from_float2(acc(2 * u), acc(2 * u + 1));
      w[m] = reinterpret_cast<const uint32_t&>(pair);
    }
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                     base + p_row_address(k, lane, warp)),
                 "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
  }
}

// Zeroes tokens [first, 64) of a page's eight V tiles (the ring's slots 1-8 of the page).
template <int kN>
__device__ __forceinline__ void zero_v_rows(SharedStorage<kN>& s, const RingPosition<SharedStorage<kN>::kSlots>& page,
                                            int first, int thread) {
  const int vecs = (kBlockN - first) * (kChunkCols / 8);  // 16-byte vectors per tile
#pragma unroll 1
  for (int t = 1; t < kTilesPerPage; ++t) {
    uint32_t unused;
    char* tile = reinterpret_cast<char*>(s.ring[page.slot_of(t, unused)]);
    for (int idx = thread; idx < vecs; idx += kConsumerThreads)
      *reinterpret_cast<uint4*>(tile + (first + idx / 8) * 128 + (idx % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
}

template <typename T, int kN>
struct Consumer {
  using E = typename CuteType<T>::type;
  static constexpr int kSlots = SharedStorage<kN>::kSlots;
  static constexpr int kColumns = kN / 4;  // distinct query rows per thread
  using Position = RingPosition<kSlots>;

  SharedStorage<kN>& s;
  const int thread, warp, lane;
#ifdef JFM_NARROW_STALLS
  mutable long long stall_tiles = 0;  // narrow_stalls.cuh
#endif

  __device__ explicit Consumer(SharedStorage<kN>& s_)
      : s(s_), thread(threadIdx.x), warp(threadIdx.x / 32), lane(threadIdx.x % 32) {}

  __device__ auto mma_s() const {
    return make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<Int<kBlockN>, Int<kN>, Int<kChunkCols>>>());
  }
  __device__ auto mma_pv() const {
    return make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<Int<kChunkCols>, Int<kN>, Int<kBlockN>>,
                                               GMMA::Major::MN, GMMA::Major::K>());
  }

  // Frees slots [first, last] of a page: lane 0 of each warp, after that warp's wgmma wait.
  __device__ __forceinline__ void release(const Position& page, int first, int last) const {
    if (lane != 0) return;
#pragma unroll 1
    for (int i = first; i <= last; ++i) {
      uint32_t unused;
      arrive_barrier(s.empty[page.slot_of(i, unused)]);
    }
  }

  // Issues S^T = K Q^T over a page's nine tiles as they land, as one commit group. Q's descriptors are made
  // per tile from an address the compiler cannot see through: else it hoists all 36 out of the page loop and
  // holds them in 72 registers (kN = 32 then spilled).
  template <typename AccS>
  __device__ __forceinline__ void issue_scores(AccS& acc, const Position& page) const {
    auto mma = mma_s();
    auto thr = mma.get_thread_slice(thread);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int i = 0; i < kTilesPerPage; ++i) {
      uint32_t phase;
      const int slot = page.slot_of(i, phase);
      JFM_TIMED(stall_tiles, wait_barrier(s.full[slot], phase));
      Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.ring[slot])), typename Layouts<E, kN>::KTile{});
      Tensor tK = thr.partition_fragment_A(sK);
      uint32_t q_tile =
          static_cast<uint32_t>(__cvta_generic_to_shared(s.q)) + q_byte_offset<kN>(0, dims_tile(i) * kChunkCols);
      asm volatile("" : "+r"(q_tile));
      Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(__cvta_shared_to_generic(q_tile))),
                              typename Layouts<E, kN>::QTile{});
      Tensor tQ = thr.partition_fragment_B(sQ);
      CUTE_UNROLL
      for (int k = 0; k < kChunkCols / 16; ++k) {
        cute::gemm(mma, tK(_, _, k), tQ(_, _, k), acc);
        mma.accumulate_ = GMMA::ScaleOut::One;
      }
    }
    warpgroup_commit_batch();
    warpgroup_fence_operand(acc);
  }

  // Issues O^T += V^T P^T over a page's eight V tiles, as one commit group.
  template <typename AccO, typename FragP>
  __device__ __forceinline__ void issue_pv(AccO (&acc)[kVTiles], const FragP& tP, const Position& page) const {
    auto mma = mma_pv();
    auto thr = mma.get_thread_slice(thread);
    CUTE_UNROLL
    for (int b = 0; b < kVTiles; ++b) warpgroup_fence_operand(acc[b]);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::One;
    CUTE_UNROLL
    for (int b = 0; b < kVTiles; ++b) {
      uint32_t unused;
      Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.ring[page.slot_of(b + 1, unused)])),
                              typename Layouts<E, kN>::VTile{});
      Tensor tV = thr.partition_fragment_A(sV);
      CUTE_UNROLL
      for (int k = 0; k < kBlockN / 16; ++k) cute::gemm(mma, tV(_, _, k), tP(_, _, k), acc[b]);
    }
    warpgroup_commit_batch();
    CUTE_UNROLL
    for (int b = 0; b < kVTiles; ++b) warpgroup_fence_operand(acc[b]);
  }

  // Each column's combination (op: max or sum) over the warpgroup's 64 tokens, in every thread that holds the
  // column: over the warp's 16 (lanes with the same lane % 4), then over the four warps through `part` and a
  // barrier, in a fixed order so that the result does not depend on which warp came first.
  template <typename Op>
  __device__ __forceinline__ void reduce_columns(float (&values)[kColumns], float (&part)[4][kN], Op op) const {
#pragma unroll
    for (int j = 0; j < kColumns; ++j) {
      values[j] = op(values[j], __shfl_xor_sync(0xffffffffu, values[j], 4));
      values[j] = op(values[j], __shfl_xor_sync(0xffffffffu, values[j], 8));
      values[j] = op(values[j], __shfl_xor_sync(0xffffffffu, values[j], 16));
    }
    if (lane < 4) {
#pragma unroll
      for (int j = 0; j < kColumns; ++j) part[warp][fragment_column(j, lane)] = values[j];
    }
    hopper::named_sync(kBarConsumer, kConsumerThreads);
#pragma unroll
    for (int j = 0; j < kColumns; ++j) {
      const int col = fragment_column(j, lane);
      values[j] = op(op(part[0][col], part[1][col]), op(part[2][col], part[3][col]));
    }
  }

  // The page's scores to P in place: masks tokens at or past `visible` (per column), raises each column's
  // running maximum m (base 2, scaled) to the page's, through the warps' exchange in s.max_part[parity], and
  // returns each column's rescale factor 2^(m_old - m_new). sum: this thread's part of each column's sum.
  template <typename AccS>
  __device__ __forceinline__ void softmax(AccS& acc, const int (&visible)[kColumns], float scale_log2, int parity,
                                          float (&m)[kColumns], float (&sum)[kColumns],
                                          float (&factor)[kColumns]) const {
    float col_max[kColumns];
#pragma unroll
    for (int j = 0; j < kColumns; ++j) col_max[j] = -INFINITY;
    bool whole = true;
#pragma unroll
    for (int j = 0; j < kColumns; ++j) whole = whole && visible[j] >= kBlockN;
    if (whole) {
#pragma unroll
      for (int v = 0; v < size(acc); ++v) col_max[column_index(v)] = fmaxf(col_max[column_index(v)], acc(v));
    } else {
#pragma unroll
      for (int v = 0; v < size(acc); ++v) {
        acc(v) = fragment_m(v, lane, warp) < visible[column_index(v)] ? acc(v) : -INFINITY;
        col_max[column_index(v)] = fmaxf(col_max[column_index(v)], acc(v));
      }
    }
    reduce_columns(col_max, s.max_part[parity], [](float a, float b) { return fmaxf(a, b); });
#pragma unroll
    for (int j = 0; j < kColumns; ++j) {
      const float m_new = fmaxf(m[j], col_max[j] * scale_log2);
      factor[j] = exp2f(m[j] - (m_new == -INFINITY ? 0.f : m_new));
      m[j] = m_new;
    }
    float page_sum[kColumns];
#pragma unroll
    for (int j = 0; j < kColumns; ++j) page_sum[j] = 0.f;
#pragma unroll
    for (int v = 0; v < size(acc); ++v) {
      const int j = column_index(v);
      const float m_use = m[j] == -INFINITY ? 0.f : m[j];  // a column with no key yet keeps P = 0, not NaN
      acc(v) = exp2f(fmaf(acc(v), scale_log2, -m_use));
      page_sum[j] += acc(v);
    }
#pragma unroll
    for (int j = 0; j < kColumns; ++j) sum[j] = sum[j] * factor[j] + page_sum[j];
  }

  template <typename AccO>
  __device__ __forceinline__ void rescale(AccO (&acc)[kVTiles], const float (&factor)[kColumns]) const {
    bool ones = true;
#pragma unroll
    for (int j = 0; j < kColumns; ++j) ones = ones && factor[j] == 1.f;
    if (__all_sync(0xffffffffu, ones)) return;
#pragma unroll
    for (int b = 0; b < kVTiles; ++b)
#pragma unroll
      for (int v = 0; v < size(acc[b]); ++v) acc[b](v) *= factor[column_index(v)];
  }

  // The chunk's end: the column sums meet across the warpgroup (s.sum_part[parity]); O^T / sum goes to out
  // (or the split's partial), and lanes 0-3 of warp 0 write the LSE of their columns.
  template <typename AccO>
  __device__ __forceinline__ void epilogue(const DecodeParams& p, const Chunk& c, const AccO (&acc)[kVTiles],
                                           const float (&m)[kColumns], const float (&sum)[kColumns],
                                           int parity) const {
    const int head_kv = blockIdx.y, group = p.h_q / p.h_kv;
    float total[kColumns], inv_sum[kColumns];
#pragma unroll
    for (int j = 0; j < kColumns; ++j) total[j] = sum[j];
    reduce_columns(total, s.sum_part[parity], [](float a, float b) { return a + b; });
#pragma unroll
    for (int j = 0; j < kColumns; ++j) inv_sum[j] = total[j] > 0.f ? 1.f / total[j] : 0.f;
    // Column by column: its row of out (a single split) or of the split's partial, null past q_rows, then its
    // two values in each of the eight blocks. The divisions by the group run once per column, and the row is
    // computed from a lane number the compiler cannot see through (else it hoists the pointers out of the page
    // loop and holds them in registers there). The accumulators are read on every thread and only the stores
    // predicated (reading them on a divergent path makes ptxas serialize the wgmmas).
    int my_lane = lane;
    asm volatile("" : "+r"(my_lane));
#pragma unroll
    for (int j = 0; j < kColumns; ++j) {
      const int row = fragment_column(j, my_lane);
      const bool real = row < p.q_rows;
      const int s_idx = row / group, head = head_kv * group + row % group;
      T* out_row = real && c.final_output
                       ? static_cast<T*>(p.out) + ((static_cast<size_t>(c.seq) * p.s_q + s_idx) * p.h_q + head) * kHeadDimV
                       : nullptr;
      float* partial_row = real && !c.final_output
                               ? p.o_accum + ((static_cast<size_t>(c.split) * p.h_kv + head_kv) * p.q_rows + row) * kHeadDimV
                               : nullptr;
#pragma unroll
      for (int b = 0; b < kVTiles; ++b)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int v = 4 * (j / 2) + j % 2 + 2 * half;  // column_index(v) == j
          const int dim = b * kChunkCols + fragment_m(v, lane, warp);
          const float value = acc[b](v) * inv_sum[j];
          if (out_row != nullptr) out_row[dim] = Element<T>::from_float2(value, 0.f).x;
          if (partial_row != nullptr) partial_row[dim] = value;
        }
    }
    if (warp == 0 && lane < 4) {
#pragma unroll
      for (int j = 0; j < kColumns; ++j) {
        const int row = fragment_column(j, lane);
        if (row < p.q_rows) hopper::store_row_lse(p, c, row, m[j], total[j], group);
      }
    }
  }

  // Issues the Q load of the chunk after `seq` if it has pages to compute (called after the chunk's last S), so that
  // it lands behind this chunk's last P V and epilogue. Returns whether it did.
  __device__ __forceinline__ bool prefetch_next_q(const DecodeParams& p, const PartWalk& walk, int seq) const {
    if (seq >= walk.last) return false;
    const Chunk next = walk.chunk(p, seq + 1);
    if (next.skip || next.block_end <= next.block_begin) return false;
    issue_q_load<T, kN>(p, s, next.seq, thread);
    return true;
  }

  __device__ __forceinline__ void run(const DecodeParams& p) {
    const int group = p.h_q / p.h_kv;
    const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
    auto mma_s_ = mma_s();
    auto mma_pv_ = mma_pv();
    Tensor sP = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.p)), typename Layouts<E, kN>::P{});
    Tensor tP = mma_pv_.get_thread_slice(thread).partition_fragment_B(sP);
    Tensor tS = partition_fragment_C(mma_s_, Shape<Int<kBlockN>, Int<kN>>{});
    using AccO = decltype(partition_fragment_C(mma_pv_, Shape<Int<kChunkCols>, Int<kN>>{}));
    AccO tO[kVTiles];
    static_assert(decltype(size(tS))::value == kN / 2 && decltype(size(tO[0]))::value == kN / 2);
    static_assert(decltype(size<2>(tP))::value == kBlockN / 16);

#ifdef JFM_NARROW_STALLS
    const long long stall_start = clock64();
    long long stall_wgmma = 0, stall_chunk_ends = 0;
#endif
    Position page;          // the ring position of the next page to consume
    int pages_done = 0;     // the parity of s.max_part
    int chunks_done = 0;    // the parity of s.sum_part
    bool q_issued = false;  // this chunk's Q load was issued by the previous chunk
    const PartWalk walk(p);
    for (int seq = walk.first; seq <= walk.last; ++seq) {
      const Chunk c = walk.chunk(p, seq);
      if (c.skip) continue;
      const int n_pages = c.block_end - c.block_begin;
      // Visible keys of this thread's columns: [0, limit). A column past q_rows is never stored: it sees every
      // valid key, so that it does not send its thread down the masked path on every page.
      int limit[kColumns];
#pragma unroll
      for (int j = 0; j < kColumns; ++j) {
        const int row = fragment_column(j, lane);
        limit[j] = row >= p.q_rows ? kMaxPagesPerSeq * kPageSize
                                   : (p.causal ? c.length - p.s_q + row / group + 1 : c.length);
      }
      float m[kColumns], sum[kColumns];
#pragma unroll
      for (int j = 0; j < kColumns; ++j) m[j] = -INFINITY, sum[j] = 0.f;
#pragma unroll
      for (int b = 0; b < kVTiles; ++b) clear(tO[b]);

      if (n_pages > 0) {
        // The previous chunk's S are complete on every warp: its epilogue's barrier follows their waits.
        if (!q_issued) issue_q_load<T, kN>(p, s, c.seq, thread);
        q_issued = false;
        hopper::wait_q_load();
        hopper::fence_async_shared();
        hopper::named_sync(kBarConsumer, kConsumerThreads);
        int valid = hopper::valid_tokens(p, c, c.block_begin);
        issue_scores(tS, page);
        for (int n = 0; n < n_pages; ++n) {
          const int block = c.block_begin + n;
          JFM_TIMED(stall_wgmma, warpgroup_wait<0>());  // S(n); P V(n - 1) was waited for already
#ifdef JFM_NARROW_STALLS
          if (thread == 0 && pages_done == 0) clock_first_page();
#endif
          warpgroup_fence_operand(tS);
          release(page, 0, 0);  // the rope tile
          int visible[kColumns];
#pragma unroll
          for (int j = 0; j < kColumns; ++j) visible[j] = min(valid, limit[j] - block * kBlockN);
          float factor[kColumns];
          softmax(tS, visible, scale_log2, pages_done & 1, m, sum, factor);
          // Past the exchange's barrier every warp has waited for this S; after the chunk's last, Q is free.
          if (n + 1 == n_pages) q_issued = prefetch_next_q(p, walk, seq);
          // Every warp is past its wait for S(n) (the exchange's barrier), so P V(n - 1) no longer reads s.p
          // and S(n) no longer reads the page's rows past `valid`.
          store_p<T, kN>(s, tS, thread);
          if (valid < kBlockN) zero_v_rows(s, page, valid, thread);
          hopper::fence_async_shared();
          hopper::named_sync(kBarConsumer, kConsumerThreads);
          rescale(tO, factor);
          issue_pv(tO, tP, page);
          const Position this_page = page;
          page = page.next_page();
          ++pages_done;
          // P V(n) is waited for before S(n + 1) is issued, because that issue waits for page n + 1's tiles to
          // land: page n's V tiles must not stay held meanwhile. On the memory-bound rows the consumer mostly
          // waits for pages, and the ring's free slots are the bytes in flight.
          JFM_TIMED(stall_wgmma, warpgroup_wait<0>());
#pragma unroll
          for (int b = 0; b < kVTiles; ++b) warpgroup_fence_operand(tO[b]);
          release(this_page, 1, kVTiles);
          if (n + 1 < n_pages) {
            valid = hopper::valid_tokens(p, c, block + 1);
            issue_scores(tS, page);
          }
        }
        // Nothing is in flight here, but ptxas cannot see that the last page issued no S, and would add this
        // wait inside the epilogue.
        warpgroup_wait<0>();
      }
      JFM_TIMED(stall_chunk_ends, epilogue(p, c, tO, m, sum, chunks_done & 1));
      ++chunks_done;
    }
#ifdef JFM_NARROW_STALLS
    if (thread == 0) {
      add_stall(kTotal, clock64() - stall_start);
      add_stall(kTileWait, stall_tiles);
      add_stall(kWgmmaWait, stall_wgmma);
      add_stall(kChunkEnds, stall_chunk_ends);
      add_stall(kPages, pages_done);
      add_stall(kCtas, 1);
      add_stall(kChunks, chunks_done);
      clock_cta_end(pages_done > 0);
    }
#endif
  }
};

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const DecodeParams p, const __grid_constant__ CUtensorMap kv_map) {
  extern __shared__ char smem_raw[];
  SharedStorage<kN>& s = hopper::aligned_shared_storage<SharedStorage<kN>>(smem_raw);
  if (threadIdx.x == 0) {
#ifdef JFM_NARROW_STALLS
    clock_cta_start();
#endif
#pragma unroll 1
    for (int slot = 0; slot < SharedStorage<kN>::kSlots; ++slot) {
      initialize_barrier(s.full[slot], 1);
      initialize_barrier(s.empty[slot], 4);  // lane 0 of each consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#ifndef JFM_PDL_LATE_TRIGGER
    hopper::allow_dependent_launch();
#endif
  }
  __syncthreads();
  if (hopper::warp_uniform_warpgroup() == 0) {
    Consumer<T, kN> consumer(s);
    consumer.run(p);
  } else {
    produce<kN>(p, &kv_map, s);
  }
}

}  // namespace narrow
}  // namespace jax_flashmla
