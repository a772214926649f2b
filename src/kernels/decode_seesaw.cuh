// Split-KV MLA decode, Hopper (sm_90a), d = 576, dv = 512: the "seesaw" schedule, the default decode kernel on
// Hopper for head groups of more than 32 query rows (decode_launch.cuh; decode_narrow.cuh takes the narrower
// ones unless JAX_FLASHMLA_DECODE_KERNEL=seesaw; =hopper selects decode_hopper.cuh instead).
//
// Why: in decode_hopper.cuh one warpgroup computes every S = Q K^T and its softmax, so the tensor cores idle
// during each softmax (benchmarks/NOTES.md). Here the two warpgroups take pages in pairs (K0, K1):
//   A (threads 0-127)   S0 = Q K0^T, softmax of S0, owns O[:, 0:256]
//   B (threads 128-255) S1 = Q K1^T, softmax of S1, owns O[:, 256:512]
// and each warpgroup's softmax runs while the other's GEMMs keep the tensor cores busy. Per pair, with m the
// running row maximum (base 2, scaled), shared through s.row_max:
//   A: m0 = max(m, rowmax S0), P0 = 2^(S0 - m0), O_A = O_A 2^(m - m0) + P0 V0_left          (P0 from registers)
//   B: m1 = max(m0, rowmax S1), P1 = 2^(S1 - m1), O_B = O_B 2^(m - m1) + P1 V1_right         (P1 from registers)
//   A: hands B P0' = P0 2^(m0 - m1) in shared memory;  B: O_B += P0' V0_right
//   B: hands A P1 in shared memory;                    A: O_A = O_A 2^(m0 - m1) + P1 V1_left
// Then A computes S of the next pair's K0 and B of its K1, overlapping the other's P V.
//
// Shared memory: Q (72 KiB), two page stages (K0, K1: 72 KiB each), P0 (8 KiB): 224 KiB. P1 has no room of its
// own: it lives in Q's rope tile (columns 512-575), which both warpgroups copy to registers when Q arrives;
// the rope part of S is a register-A wgmma. There is no producer warpgroup (it would cap the consumers'
// registers): the warpgroup that last reads a 64-column tile of a stage issues the TMA load that refills it
// with the page two tiles ahead, one mbarrier per tile. The page stream runs on across a CTA's chunks: the last
// refills of a chunk load the next chunk's first two pages, and its epilogue issues the next Q (by TMA, one
// thread, where the head group allows: tensor_maps.h). Hand-offs between the warpgroups, the epilogue's row sums
// included, are mbarriers (arrive releases, wait acquires), which compute-sanitizer's racecheck models.
#pragma once

#include "kernels/decode_hopper.cuh"

namespace jax_flashmla {
namespace seesaw {

using namespace cute;
using hopper::CuteType;
using hopper::kBlockM;
using hopper::kBlockN;
using hopper::kChunkBytes;
using hopper::kChunkCols;
using hopper::kHalfV;
using hopper::kHeadDim;
using hopper::kHeadDimV;
using hopper::kNumChunks;
using hopper::swizzled_offset;
using hopper::aligned_shared_storage;
using hopper::fragment_word_offset;
using hopper::pack_words;
using hopper::rescale_rows;
using hopper::store_tile_words;
using hopper::valid_tokens;
using hopper::warp_uniform_warpgroup;

constexpr int kThreads = 256;
constexpr int kTileElems = kBlockN * kChunkCols;  // one 64x64 tile
constexpr int kRopeTile = kNumChunks - 1;         // Q/K tile 8: the rope dims
constexpr int kBarA = 1, kBarB = 2;               // named barriers of one warpgroup (128 threads)

template <typename E>
struct Layouts {
  using Latent = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kBlockM>, Int<kHeadDimV>>{}));
  using Tile = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using VHalf = typename hopper::Layouts<E>::VHalf;
};

struct alignas(1024) SharedStorage {
  uint16_t q[kBlockM * kHeadDim];  // tile 8 holds P1 once the rope dims are in registers
  uint16_t kv[2][kBlockN * kHeadDim];
  uint16_t p0[kTileElems];
  float row_max[kBlockM];  // running maximum, written by A (m0) then B (m1) each pair
  float scale0[kBlockM];   // 2^(m - m0)
  float scale1[kBlockM];   // 2^(m0 - m1)
  float sum_a[2][kBlockM];  // epilogue: each warpgroup's row sums, double-buffered by chunk parity
  float sum_b[2][kBlockM];
  uint64_t full[2][kNumChunks];  // a stage's tile landed (or was skipped: invalid page)
  uint64_t scale0_ready;         // A -> B: row_max = m0, scale0
  uint64_t scale1_ready;         // B -> A: row_max = m1, scale1
  uint64_t p0_ready;             // A -> B: P0' in p0
  uint64_t p1_ready;             // B -> A: P1 in Q's rope tile
  uint64_t sums_ready;           // both ways, once per chunk: sum_a and sum_b hold the row sums
  uint64_t q_full;               // Q landed (when it comes by TMA), once per chunk
};
constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;
static_assert(kSmemBytes <= 227 * 1024, "seesaw shared storage exceeds a block's 227 KiB");

__device__ __forceinline__ uint16_t* p1_tile(SharedStorage& s) { return s.q + kRopeTile * kTileElems; }

// Loads tile t of page `page` into a stage; an invalid page completes the tile's barrier with no bytes (the S owner
// then zeroes the stage). One thread.
__device__ __forceinline__ void load_tile(const DecodeParams& p, const CUtensorMap* kv_map, SharedStorage& s,
                                          int layer, uint64_t hint, int stage, int page, int t) {
  if (page_in_pool(p, page)) {
    set_barrier_transaction_bytes(s.full[stage][t], kChunkBytes);
    SM90_TMA_LOAD_4D::copy(kv_map, &s.full[stage][t], hint,
                           reinterpret_cast<char*>(s.kv[stage]) + t * kChunkBytes, t * kChunkCols, blockIdx.y,
                           page * kPageSize, layer);
  } else {
    arrive_barrier(s.full[stage][t]);
  }
}
// Tiles [first, last], all by the calling thread: the loads a chunk starts with.
__device__ __forceinline__ void load_tiles(const DecodeParams& p, const CUtensorMap* kv_map, SharedStorage& s,
                                           int layer, uint64_t hint, int stage, int page, int first, int last) {
  for (int t = first; t <= last; ++t) load_tile(p, kv_map, s, layer, hint, stage, page, t);
}

// The refills inside the page loop: the whole warpgroup calls this after its wgmma wait, and lane 0 of warp w loads
// tiles first + w, first + w + 4, ... A single issuing thread kept its warp about 400 instructions per pair behind
// the other three, which then waited for it at the next wgmma (Nsight Compute's warpgroup_arrive stall, 14% of the
// samples, benchmarks/NOTES.md). As with one thread, a warp's own wait stands for the warpgroup's: a wgmma is one
// operation of the four warps.
__device__ __forceinline__ void refill_tiles(const DecodeParams& p, const CUtensorMap* kv_map, SharedStorage& s,
                                             int layer, uint64_t hint, int stage, int page, int first, int last,
                                             int thread) {
  if (thread % 32 != 0) return;
#pragma unroll 1
  for (int t = first + thread / 32; t <= last; t += 4) load_tile(p, kv_map, s, layer, hint, stage, page, t);
}

// How Q reaches shared memory. Where a 64-row block of Q is one box of make_q_tensor_map's descriptor
// (box_bytes > 0), one thread issues nine boxes, one per 64-dim tile, that complete on s.q_full: the other
// threads' load/store units stay free for the epilogue's stores it overlaps. Otherwise A's threads copy it
// with cp.async, complete at each thread's wait_q_load.
struct QSource {
  const CUtensorMap* map;
  int box_bytes;
};

__device__ __forceinline__ void issue_q_boxes(const DecodeParams& p, const QSource& q, SharedStorage& s, int seq) {
  const int head_kv = blockIdx.y, row0 = grid_row_block() * kBlockM, group = p.h_q / p.h_kv;
  set_barrier_transaction_bytes(s.q_full, kNumChunks * q.box_bytes);
#pragma unroll
  for (int t = 0; t < kNumChunks; ++t)
    SM90_TMA_LOAD_4D::copy(q.map, &s.q_full, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                           reinterpret_cast<char*>(s.q) + t * kChunkBytes, t * kChunkCols, row0 % group, head_kv,
                           seq * p.s_q + row0 / group);
}

// The chunk after `seq` in this part, if there is one to compute.
__device__ __forceinline__ bool next_chunk(const DecodeParams& p, const PartWalk& walk, int seq, Chunk& next) {
  if (seq >= walk.last) return false;
  next = walk.chunk(p, seq + 1);
  return !next.skip;
}

// A chunk's first page of each stage (K0, K1), if it has one.
__device__ __forceinline__ bool has_first_page(const Chunk& c, int stage) {
  return c.block_end - c.block_begin > stage;
}
__device__ __forceinline__ int first_page(const DecodeParams& p, const Chunk& c, int stage) {
  return page_of(p, c.seq, c.block_begin + stage);
}

// The loads a chunk starts with: its first two pages, one per stage (thread 0 of A), and Q. Bits of `done`
// (kPrimedStage0/1, kPrimedQ) name the loads already issued: the last pairs of the previous chunk issue the
// pages, its epilogue Q.
constexpr unsigned kPrimedStage0 = 1, kPrimedStage1 = 2, kPrimedQ = 4;
template <typename T>
__device__ __forceinline__ void issue_chunk_loads(const DecodeParams& p, const CUtensorMap* kv_map, const QSource& q,
                                                  SharedStorage& s, int layer, uint64_t hint, const Chunk& c,
                                                  unsigned done, int thread) {
#pragma unroll
  for (int stage = 0; stage < 2; ++stage)
    if (thread == 0 && has_first_page(c, stage) && !(done & (kPrimedStage0 << stage)))
      load_tiles(p, kv_map, s, layer, hint, stage, first_page(p, c, stage), 0, kNumChunks - 1);
  if (done & kPrimedQ) return;
  if (q.box_bytes == 0)
    hopper::issue_q_load<T>(p, s, c.seq, thread);
  else if (thread == 0)
    issue_q_boxes(p, q, s, c.seq);
}

// The first two pages of the CTA's next chunk (next_chunk): where a stage has no page left in this chunk, its
// refill takes the next chunk's page of the same parity, so the page stream runs on across chunks instead of
// draining at each chunk's end.
struct NextChunkStart {
  bool has[2];
  int page[2];
};
__device__ __forceinline__ NextChunkStart next_chunk_start(const DecodeParams& p, const PartWalk& walk, int seq) {
  NextChunkStart n{{false, false}, {0, 0}};
  Chunk c;
  if (!next_chunk(p, walk, seq, c)) return n;
#pragma unroll
  for (int stage = 0; stage < 2; ++stage) {
    n.has[stage] = has_first_page(c, stage);
    if (n.has[stage]) n.page[stage] = first_page(p, c, stage);
  }
  return n;
}

// Hand-offs between the warpgroups. The mbarrier arrive releases and the wait acquires, for the hardware; the
// empty asm with a memory clobber keeps the compiler from moving shared-memory accesses across them.
__device__ __forceinline__ void release(uint64_t& barrier) {
  asm volatile("" ::: "memory");
  arrive_barrier(barrier);
}
__device__ __forceinline__ void acquire(uint64_t& barrier, int phase) {
  wait_barrier(barrier, phase);
  asm volatile("" ::: "memory");
}

// The block-wide barrier inside run_warpgroup. The warpgroups reach it from different instructions (each runs
// its own instantiation), which the .aligned form behind __syncthreads() leaves undefined (PTX ISA, barrier).
__device__ __forceinline__ void sync_warpgroups() { asm volatile("barrier.sync 0;\n" ::: "memory"); }

// Everything one warpgroup needs: its role, MMAs, fragments.
template <typename T, bool kIsA>
struct Warpgroup {
  using E = typename CuteType<T>::type;
  static constexpr int kStage = kIsA ? 0 : 1;  // the stage whose S this warpgroup computes
  static constexpr int kBar = kIsA ? kBarA : kBarB;

  SharedStorage& s;
  const int thread;  // 0..127 within the warpgroup

  __device__ explicit Warpgroup(SharedStorage& s_) : s(s_), thread(threadIdx.x % 128) {}

  __device__ auto mma_s_latent() const {
    return make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDimV>>>());
  }
  __device__ auto mma_s_rope() const {
    return make_tiled_mma(GMMA::rs_op_selector<E, E, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kChunkCols>>>());
  }
  __device__ auto mma_pv_rs() const {
    return make_tiled_mma(GMMA::rs_op_selector<E, E, float, Shape<Int<kBlockM>, Int<kHalfV>, Int<kBlockN>>,
                                               GMMA::Major::K, GMMA::Major::MN>());
  }
  __device__ auto mma_pv_ss() const {
    return make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<Int<kBlockM>, Int<kHalfV>, Int<kBlockN>>,
                                               GMMA::Major::K, GMMA::Major::MN>());
  }
  __device__ auto v_half(int stage) const {  // this warpgroup's half of V^T in a stage
    return make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.kv[stage]) + (kIsA ? 0 : kHalfV * kBlockN)),
                       typename Layouts<E>::VHalf{});
  }

  // Issues S = Q K^T over tiles [first, end) of the page in this warpgroup's stage, as one commit group: the
  // latent tiles as they land, then (end == 9) the rope tile with Q from registers. `start`: this call begins
  // S (from zero), after zeroing the page's rows past `valid` (they may hold NaN). A page's S may be issued in
  // two calls, in the order its tiles are refilled, so the tiles refilled last are waited for last.
  template <typename AccS, typename Q8>
  __device__ __forceinline__ void issue_scores(AccS& acc, const Q8& q8, int phase, int valid, bool start, int first,
                                               int end) {
    if (start && valid < kBlockN) {
      wait_tiles(kStage, phase, 0, kNumChunks);
      hopper::zero_rows(s.kv[kStage], valid, thread);
      hopper::fence_async_shared();
      hopper::named_sync(kBar, 128);
    }
    auto mma_l = mma_s_latent();
    auto mma_r = mma_s_rope();
    auto thr_l = mma_l.get_thread_slice(thread);
    auto thr_r = mma_r.get_thread_slice(thread);
    Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.q)), typename Layouts<E>::Latent{});
    Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.kv[kStage])), typename Layouts<E>::Latent{});
    Tensor sK8 = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.kv[kStage]) + kRopeTile * kTileElems),
                             typename Layouts<E>::Tile{});
    Tensor tQ = thr_l.partition_fragment_A(sQ);
    Tensor tK = thr_l.partition_fragment_B(sK);
    Tensor tK8 = thr_r.partition_fragment_B(sK8);
    static_assert(decltype(size<2>(tQ))::value == 4 * (kNumChunks - 1));
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_l.accumulate_ = start ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
    CUTE_UNROLL
    for (int t = 0; t < kNumChunks - 1; ++t) {
      if (t < first || t >= end) continue;
      wait_barrier(s.full[kStage][t], phase);
      CUTE_UNROLL
      for (int k = 0; k < 4; ++k) {
        cute::gemm(mma_l, tQ(_, _, 4 * t + k), tK(_, _, 4 * t + k), acc);
        mma_l.accumulate_ = GMMA::ScaleOut::One;
      }
    }
    if (end == kNumChunks) {
      wait_barrier(s.full[kStage][kRopeTile], phase);
      mma_r.accumulate_ = start && first == kRopeTile ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
      CUTE_UNROLL
      for (int k = 0; k < 4; ++k) cute::gemm(mma_r, q8(_, _, k), tK8(_, _, k), acc);
    }
    warpgroup_commit_batch();
    warpgroup_fence_operand(acc);
  }

  // Waits until tiles [first, end) of a stage hold the current page. The other warpgroup's stage is read for
  // its V half only after that warpgroup's P hand-off, which already implies this; waiting here keeps the
  // dependence on the copy explicit, as the hand-off alone would make it transitive.
  __device__ __forceinline__ void wait_tiles(int stage, int phase, int first, int end) const {
    for (int t = first; t < end; ++t) wait_barrier(s.full[stage][t], phase);
  }
};

// The softmax of a tile in two steps, so that a warpgroup can hand the other its new row maximum (all the
// other needs) before the exponentials, which then overlap the other's softmax.
// Step 1: masks S (columns >= visible) and raises m, the running row maximum (base 2, scaled), to the tile's.
// A page that every row sees whole (all but the last pages) skips the mask: 64 compares and selects a thread
// less in the loop both warpgroups run for every page (about 2% of the kernel time at s_k 16384, NOTES.md).
template <typename AccS>
__device__ __forceinline__ void raise_row_max(AccS& acc, const int visible[2], float scale_log2, float m[2]) {
  const int lane = threadIdx.x % 32;
  float tile_max[2] = {-INFINITY, -INFINITY};  // value v belongs to row half (v / 2) % 2
  if (visible[0] >= kBlockN && visible[1] >= kBlockN) {
#pragma unroll
    for (int v = 0; v < size(acc); ++v) tile_max[(v / 2) % 2] = fmaxf(tile_max[(v / 2) % 2], acc(v));
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int limit = visible[h] - 2 * (lane % 4);
#pragma unroll
      for (int g = 0; g < kBlockN / 8; ++g)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int v = 4 * g + 2 * h + e;
          acc(v) = 8 * g + e < limit ? acc(v) : -INFINITY;
          tile_max[h] = fmaxf(tile_max[h], acc(v));
        }
    }
  }
  // The shuffles stay out of the branch, which may diverge within a warp (causal rows see different lengths).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    m[h] = fmaxf(m[h], tile_max[h] * scale_log2);
  }
}

// Step 2: P = 2^(S scale - m) in place. tile_sum: this thread's part of each row's sum of P.
template <typename AccS>
__device__ __forceinline__ void exponentiate(AccS& acc, float scale_log2, const float m[2], float tile_sum[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float m_use = m[h] == -INFINITY ? 0.f : m[h];  // a row with no key yet keeps P = 0, not NaN
    float part[4] = {0.f, 0.f, 0.f, 0.f};  // four short chains, not one of 16 dependent adds
#pragma unroll
    for (int g = 0; g < kBlockN / 8; ++g)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int v = 4 * g + 2 * h + e;
        acc(v) = exp2f(fmaf(acc(v), scale_log2, -m_use));
        part[2 * (g % 2) + e] += acc(v);
      }
    tile_sum[h] = (part[0] + part[1]) + (part[2] + part[3]);
  }
}

__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return exp2f(m_old - (m_new == -INFINITY ? 0.f : m_new));
}

__device__ __forceinline__ int thread_row(int thread, int h) { return (thread / 32) * 16 + (thread % 32) / 4 + 8 * h; }

// One thread per row (lane % 4 == 0) publishes the row's new maximum and a rescale factor for the other
// warpgroup (before a release).
__device__ __forceinline__ void publish_rows(SharedStorage& s, float* factors, const float m[2], const float f[2],
                                             int thread) {
  __syncwarp();  // the quad's other lanes read these rows' old values from shared memory just before
  if (thread % 4 != 0) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    s.row_max[thread_row(thread, h)] = m[h];
    factors[thread_row(thread, h)] = f[h];
  }
}

// Forced inline: left to itself nvcc compiled A's instantiation as a called function once the epilogue grew,
// with the parameters on the stack and about 230 local-memory accesses in the loop.
template <typename T, bool kIsA>
__device__ __forceinline__ void run_warpgroup(const DecodeParams& p, const CUtensorMap* kv_map, const QSource& q,
                                              SharedStorage& s) {
  using WG = Warpgroup<T, kIsA>;
  using E = typename WG::E;
  WG wg(s);
  const int thread = wg.thread, lane = thread % 32;
  const int row0 = grid_row_block() * kBlockM, group = p.h_q / p.h_kv;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const int layer = pool_layer(p);  // read once: the refills run on the critical path
  const uint64_t hint = hopper::kv_cache_hint();

  auto mma_pv_rs = wg.mma_pv_rs();
  auto mma_pv_ss = wg.mma_pv_ss();
  auto thr_rs = mma_pv_rs.get_thread_slice(thread);
  auto thr_ss = mma_pv_ss.get_thread_slice(thread);
  auto mma_rope = wg.mma_s_rope();
  Tensor sTile = make_tensor(make_smem_ptr(reinterpret_cast<E*>(s.p0)), typename Layouts<E>::Tile{});
  Tensor tQ8 = mma_rope.get_thread_slice(thread).partition_fragment_A(sTile);  // Q's rope tile, registers
  Tensor tQ8_words = recast<uint32_t>(tQ8);
  Tensor tS = partition_fragment_C(wg.mma_s_latent(), Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tO = partition_fragment_C(mma_pv_rs, Shape<Int<kBlockM>, Int<kHalfV>>{});
  Tensor tP = thr_rs.partition_fragment_A(sTile);  // own P as the A operand
  Tensor tP_words = recast<uint32_t>(tP);
  // The other warpgroup's P, read from shared memory: P1 (A reads Q's rope tile) or P0' (B reads p0).
  Tensor sOtherP = make_tensor(make_smem_ptr(reinterpret_cast<E*>(kIsA ? p1_tile(s) : s.p0)),
                               typename Layouts<E>::Tile{});
  Tensor tOtherP = thr_ss.partition_fragment_A(sOtherP);
  static_assert(decltype(size(tS))::value == 32 && decltype(size(tP_words))::value == 16 &&
                decltype(size(tQ8_words))::value == 16);

  int chunks_done = 0;     // chunks this CTA finished: the phase of sums_ready, the sums' buffer
  int pairs_done = 0;      // pairs this CTA finished: the phase of the four hand-off barriers
  int pages[2] = {0, 0};   // pages each stage has held so far: the phase of its full barriers
  unsigned primed = 0;     // this chunk's loads issued before it began (kPrimed* bits)
  const PartWalk walk(p);
  for (int seq = walk.first; seq <= walk.last; ++seq) {
    const Chunk c = walk.chunk(p, seq);
    if (c.skip) continue;
    const int n_tiles = c.block_end - c.block_begin;
    int limit[2];  // visible keys of this thread's rows: [0, limit)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + thread_row(thread, h);
      limit[h] = row >= p.q_rows ? 0 : (p.causal ? c.length - p.s_q + row / group + 1 : c.length);
    }

    // Q and the first two pages: usually already issued by the previous chunk (the pages by its last pairs, Q by
    // its epilogue). Every earlier read of Q, the stages and P is complete either way: the previous chunk's
    // sums_ready exchange follows both warpgroups' last GEMMs.
    if (kIsA) {
      issue_chunk_loads<T>(p, kv_map, q, s, layer, hint, c, primed, thread);
      primed = 0;  // from here on, the bits are the next chunk's
    }
    if (q.box_bytes > 0) {
      acquire(s.q_full, chunks_done & 1);
    } else {
      if (kIsA) {
        hopper::wait_q_load();
        hopper::fence_async_shared();
      }
      sync_warpgroups();
    }
    const char* q_rope = reinterpret_cast<const char*>(s.q) + kRopeTile * kChunkBytes;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      tQ8_words(j) = *reinterpret_cast<const uint32_t*>(q_rope + fragment_word_offset(j, thread));
    // B overwrites the rope tile with P1 only after every thread of both warpgroups has its copy: A's through
    // its release of scale0_ready, B's through this barrier.
    hopper::named_sync(WG::kBar, 128);

    float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
    clear(tO);
    // This warpgroup's first page: K0 for A, K1 for B.
    int valid = 0;
    if (kIsA ? n_tiles > 0 : n_tiles > 1) {
      valid = valid_tokens(p, c, c.block_begin + (kIsA ? 0 : 1));
      wg.issue_scores(tS, tQ8, pages[WG::kStage] & 1, valid, true, 0, kNumChunks);
      warpgroup_wait<0>();
    }

    for (int i = 0; i < n_tiles; i += 2) {
      const bool has_k1 = i + 1 < n_tiles;
      const bool next_k0 = i + 2 < n_tiles, next_k1 = i + 3 < n_tiles;
      const int block0 = c.block_begin + i;
      const int hand_off_phase = pairs_done & 1;
      // The pages the stages take next, read now: the block-table loads complete behind this pair's softmax
      // instead of stalling the refills and the next S, which need them. A stage this pair uses for the last time
      // in the chunk takes the next chunk's first page of its parity (refill, not S: the next chunk's S needs
      // its Q).
      bool refill0 = next_k0, refill1 = next_k1;
      int next_page0 = next_k0 ? page_of(p, c.seq, block0 + 2) : 0;
      int next_page1 = next_k1 ? page_of(p, c.seq, block0 + 3) : 0;
      if (!next_k0 || (has_k1 && !next_k1)) {
        const NextChunkStart n = next_chunk_start(p, walk, seq);
        if (!next_k0) refill0 = n.has[0], next_page0 = n.page[0], primed |= n.has[0] ? kPrimedStage0 : 0;
        if (has_k1 && !next_k1) refill1 = n.has[1], next_page1 = n.page[1], primed |= n.has[1] ? kPrimedStage1 : 0;
      }
      if constexpr (kIsA) {
        // m0 = max(m, rowmax S0); O_A and the row sums move to m0; P0 = 2^(S0 - m0).
        int visible[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) visible[h] = min(valid, limit[h] - block0 * kBlockN);
        float m0[2] = {m[0], m[1]}, tile_sum[2], scale0[2];
        raise_row_max(tS, visible, scale_log2, m0);
#pragma unroll
        for (int h = 0; h < 2; ++h) scale0[h] = rescale_factor(m[h], m0[h]);
        publish_rows(s, s.scale0, m0, scale0, thread);
        release(s.scale0_ready);
        exponentiate(tS, scale_log2, m0, tile_sum);
#pragma unroll
        for (int h = 0; h < 2; ++h) sum[h] = sum[h] * scale0[h] + tile_sum[h];
        rescale_rows(tO, scale0);

        // O_A += P0 V0_left, P0 from registers. Then this warpgroup is done with K0's tiles 0-3 and 8.
        pack_words<T>(tS, tP_words);
        warpgroup_fence_operand(tP_words);
        hopper::issue_gemm<false>(mma_pv_rs, tP, thr_rs.partition_fragment_B(wg.v_half(0)), tO);
        warpgroup_fence_operand(tP_words);
        warpgroup_wait<0>();
        if (refill0) {
          refill_tiles(p, kv_map, s, layer, hint, 0, next_page0, 0, 3, thread);
          refill_tiles(p, kv_map, s, layer, hint, 0, next_page0, kRopeTile, kRopeTile, thread);
        }

        // B's m1: hand B P0' = P0 2^(m0 - m1), and move O_A and the sums to m1.
        acquire(s.scale1_ready, hand_off_phase);
        float scale1[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          scale1[h] = s.scale1[thread_row(thread, h)];
          m[h] = s.row_max[thread_row(thread, h)];
          sum[h] *= scale1[h];
        }
#pragma unroll
        for (int v = 0; v < size(tS); ++v) tS(v) *= scale1[(v / 2) % 2];
        pack_words<T>(tS, tP_words);
        store_tile_words(s.p0, tP_words, thread);
        hopper::fence_async_shared();
        release(s.p0_ready);
        rescale_rows(tO, scale1);

        // O_A += P1 V1_left (both from shared memory), with S of the next K0 issued behind it in two parts: the
        // tiles 0-3 this warpgroup refilled, then (once P1 V1_left is done and K1's tiles 0-3 are refilled for
        // B) tiles 4-8, which B refills.
        acquire(s.p1_ready, hand_off_phase);
        if (has_k1) {
          wg.wait_tiles(1, pages[1] & 1, 0, 4);
          hopper::issue_gemm<false>(mma_pv_ss, tOtherP, thr_ss.partition_fragment_B(wg.v_half(1)), tO);
        }
        if (next_k0) {
          valid = valid_tokens(p, c, block0 + 2, next_page0);
          wg.issue_scores(tS, tQ8, (pages[0] + 1) & 1, valid, true, 0, 4);
        }
        if (has_k1) {
          if (next_k0)
            warpgroup_wait<1>();
          else
            warpgroup_wait<0>();
          if (refill1) refill_tiles(p, kv_map, s, layer, hint, 1, next_page1, 0, 3, thread);
        }
        if (next_k0) wg.issue_scores(tS, tQ8, (pages[0] + 1) & 1, valid, false, 4, kNumChunks);
        warpgroup_wait<0>();
      } else {
        // m1 = max(m0, rowmax S1); O_B and the sums move from m to m1; P1 = 2^(S1 - m1).
        acquire(s.scale0_ready, hand_off_phase);
        float m1[2], scale0[2], scale1[2] = {1.f, 1.f}, tile_sum[2] = {0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m1[h] = s.row_max[thread_row(thread, h)];
          scale0[h] = s.scale0[thread_row(thread, h)];
        }
        if (has_k1) {
          const float m0[2] = {m1[0], m1[1]};
          int visible[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) visible[h] = min(valid, limit[h] - (block0 + 1) * kBlockN);
          raise_row_max(tS, visible, scale_log2, m1);
#pragma unroll
          for (int h = 0; h < 2; ++h) scale1[h] = rescale_factor(m0[h], m1[h]);
        }
        publish_rows(s, s.scale1, m1, scale1, thread);
        release(s.scale1_ready);
        // Unconditional: no branch around the exponentials for the one case that needs none (a chunk's odd last
        // page). Without K1, tS holds no scores of this pair and what comes out is dropped (P1 unused).
        exponentiate(tS, scale_log2, m1, tile_sum);
        if (!has_k1) tile_sum[0] = tile_sum[1] = 0.f;
        float factor[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          factor[h] = scale0[h] * scale1[h];
          sum[h] = sum[h] * factor[h] + tile_sum[h];
          m[h] = m1[h];
        }
        rescale_rows(tO, factor);

        // Hand A P1 (in Q's rope tile) and O_B += P1 V1_right, P1 from registers.
        if (has_k1) {
          pack_words<T>(tS, tP_words);
          store_tile_words(p1_tile(s), tP_words, thread);
          warpgroup_fence_operand(tP_words);
          hopper::issue_gemm<false>(mma_pv_rs, tP, thr_rs.partition_fragment_B(wg.v_half(1)), tO);
          warpgroup_fence_operand(tP_words);
          hopper::fence_async_shared();
        }
        release(s.p1_ready);

        // O_B += P0' V0_right, both from shared memory. Each stage's tiles are refilled as soon as their last
        // reader is done: K1's 4-8 once P1 V1_right is (the wait leaves P0' V0_right in flight), K0's 4-7 after
        // P0' V0_right. K1's tiles 0-3 are refilled by A after its P1 V1_left, the last P V of the pair, so the
        // next S1 takes its tiles in refill order: 4-8 first, 0-3 last.
        acquire(s.p0_ready, hand_off_phase);
        wg.wait_tiles(0, pages[0] & 1, 4, 8);
        hopper::issue_gemm<false>(mma_pv_ss, tOtherP, thr_ss.partition_fragment_B(wg.v_half(0)), tO);
        if (refill1) {
          warpgroup_wait<1>();
          refill_tiles(p, kv_map, s, layer, hint, 1, next_page1, 4, kRopeTile, thread);
        }
        warpgroup_wait<0>();
        if (refill0) refill_tiles(p, kv_map, s, layer, hint, 0, next_page0, 4, 7, thread);

        if (next_k1) {
          valid = valid_tokens(p, c, block0 + 3, next_page1);
          const int phase = (pages[1] + 1) & 1;
          wg.issue_scores(tS, tQ8, phase, valid, true, 4, kNumChunks);
          wg.issue_scores(tS, tQ8, phase, valid, false, 0, 4);
          warpgroup_wait<0>();
        }
      }
      ++pairs_done;
      ++pages[0];
      if (has_k1) ++pages[1];
    }

    // Epilogue: both halves share the row sums; O is normalised and written, A writes the LSE.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 1);
      sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 2);
    }
    // The exchange is an mbarrier like the other hand-offs, and the buffers alternate, so the next chunk's
    // stores never meet this chunk's loads whatever the block barriers in between.
    const int buf = chunks_done & 1;
    if (lane % 4 == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) (kIsA ? s.sum_a : s.sum_b)[buf][thread_row(thread, h)] = sum[h];
    }
    release(s.sums_ready);
    acquire(s.sums_ready, chunks_done & 1);
    // Both warpgroups' GEMMs of this chunk are complete, so Q and the stages are free: A issues the next chunk's
    // Q now (and any first page the last pairs did not), and their latency hides behind the output stores
    // instead of stalling the next chunk's first S.
    if constexpr (kIsA) {
      Chunk next;
      if (next_chunk(p, walk, seq, next)) {
        issue_chunk_loads<T>(p, kv_map, q, s, layer, hint, next, primed, thread);
        primed = kPrimedStage0 | kPrimedStage1 | kPrimedQ;
      }
    }
    float total[2], inv_sum[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      total[h] = s.sum_a[buf][thread_row(thread, h)] + s.sum_b[buf][thread_row(thread, h)];
      inv_sum[h] = total[h] > 0.f ? 1.f / total[h] : 0.f;
    }
    hopper::store_output<T>(p, c, tO, kIsA ? 0 : kHalfV, inv_sum, thread);
    if (kIsA) hopper::store_lse(p, c, m, total, row0, group, thread / 32, lane);
    ++chunks_done;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const DecodeParams p, const __grid_constant__ CUtensorMap kv_map,
                                                              const __grid_constant__ CUtensorMap q_map, int q_box_bytes) {
  extern __shared__ char smem_raw[];
  SharedStorage& s = aligned_shared_storage<SharedStorage>(smem_raw);
  const int warpgroup = warp_uniform_warpgroup();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int stage = 0; stage < 2; ++stage)
#pragma unroll
      for (int t = 0; t < kNumChunks; ++t) initialize_barrier(s.full[stage][t], 1);
    initialize_barrier(s.scale0_ready, 128);
    initialize_barrier(s.scale1_ready, 128);
    initialize_barrier(s.p0_ready, 128);
    initialize_barrier(s.p1_ready, 128);
    initialize_barrier(s.sums_ready, kThreads);
    initialize_barrier(s.q_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    hopper::allow_dependent_launch();
  }
  __syncthreads();
  const QSource q{&q_map, q_box_bytes};
  if (warpgroup == 0)
    run_warpgroup<T, true>(p, &kv_map, q, s);
  else
    run_warpgroup<T, false>(p, &kv_map, q, s);
}

}  // namespace seesaw
}  // namespace jax_flashmla
