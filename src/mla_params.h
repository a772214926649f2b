// The plain interface between the XLA FFI handlers (host C++) and the CUDA kernels (.cu).
// No CUDA or XLA types cross it beyond cudaStream_t/cudaError_t, so each side compiles on its own.
//
// Data layout shared by the scheduler, the split-KV decode kernel and the combine kernel (the fast Hopper
// kernel reuses it unchanged):
//   q        (b, s_q, h_q, d)               h_q = h_kv * g; head-group k holds query heads [k*g, (k+1)*g)
//   k_cache  (num_layers, num_pages, 64, h_kv, d)  the values are the first dv dims of each key; the kernels
//            read layer *layer_index (a device scalar, clamped into [0, num_layers)); num_layers is 1 for
//            FlashMLA's one-layer (num_pages, 64, h_kv, d) pool
//   block_table (b, max_pages) int32        ids outside [0, num_pages) mark tokens the kernels ignore
//   out      (b, s_q, h_q, dv)              lse (b, h_q, s_q) float32, natural log
// Inside head-group k the s_q*g query rows are numbered r = s*g + j (s the query token, j the head in group).
//
// Scheduler metadata (see jax_flashmla/scheduler.py, the executable spec of the same algorithm):
//   tile_metadata (num_parts, 8) int32, one row per part p of the grid:
//     [batch_begin, block_begin, batch_end, block_end, split_begin, 0, 0, 0]
//     part p walks batches batch_begin..batch_end (inclusive; idle if batch_begin > batch_end), blocks
//     [block_begin, n) of the first, [0, block_end) of the last, all blocks of those between;
//     split_begin is the first batch's local split index.
//   num_splits (b + 1) int32: prefix sums; batch i has num_splits[i+1] - num_splits[i] splits.
// Split-KV partials (extra custom-call results sized by the caller, so XLA owns the memory):
//   o_accum   (b + num_parts, h_kv, q_rows, dv) float32    lse_accum (b + num_parts, h_kv, q_rows) float32
//   partial of batch i, local split t, lives at index num_splits[i] + t. A batch with one split is written
//   straight to out/lse by the decode kernel and skipped by the combine.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace jax_flashmla {

constexpr int kPageSize = 64;             // tokens per KV page, and the kernels' KV tile
constexpr int kRowBlock = 64;             // query rows per CTA of the decode grid
constexpr int kMaxPagesPerSeq = 1 << 24;  // block_table columns: token positions stay below 2^30 in int32
constexpr int kMetadataRowInts = 8;       // ints per tile_metadata row
constexpr int kSplitOverheadBlocks = 5;   // the most a split's fixed work is charged, in 64-token blocks (the
                                          // seesaw's charge; SchedulerParams::split_overhead is each call's)
// The scheduler sums a batch's blocks and overheads in int32; jax_flashmla/scheduler.py explains the limits.
constexpr int kScheduleUnitLimit = 1 << 30;
constexpr int kNarrowMaxQueryRows = 32;   // head groups of at most this many query rows run the narrow kernel
constexpr int kMaxScheduledBatch = kScheduleUnitLimit / (kSplitOverheadBlocks + 1);
constexpr int kMaxGridYZ = 65535;         // CUDA's limit on a launch grid's y and z dimensions
constexpr int kMaxScheduleParts = kMaxGridYZ;  // the decode grid's z dimension
constexpr int kMaxQueryRows = 8 * kMaxGridYZ;  // q_rows (the combine's CTAs loop over rows beyond its grid's z)

// The most blocks of one sequence the scheduler counts (lengths beyond are clipped), for 1 <= batch <=
// kMaxScheduledBatch. A block table wider than this would leave blocks the decode reads unscheduled, so the
// decode refuses one.
#ifdef __CUDACC__
__host__ __device__
#endif
constexpr int max_scheduled_blocks(int batch) {
  return kScheduleUnitLimit / batch - kSplitOverheadBlocks < kMaxPagesPerSeq
             ? kScheduleUnitLimit / batch - kSplitOverheadBlocks
             : kMaxPagesPerSeq;
}

enum class ElementType { kBF16, kFP16 };

struct SchedulerParams {
  const int32_t* cache_seqlens;  // (b,)
  int32_t* tile_metadata;        // (num_parts, 8)
  int32_t* num_splits;           // (b + 1,)
  int batch;
  int num_parts;
  int split_overhead;  // blocks charged per split, 1..kSplitOverheadBlocks (jax_flashmla/scheduler.py)
};

struct DecodeParams {
  const void* q;
  const void* k_cache;
  const int32_t* layer_index;  // () int32: the layer of k_cache to read
  const int32_t* block_table;
  const int32_t* cache_seqlens;
  const int32_t* tile_metadata;
  const int32_t* num_splits;
  void* out;
  float* lse;
  float* o_accum;
  float* lse_accum;

  int batch, s_q, h_q, h_kv, head_dim, head_dim_v;
  int num_layers;            // layers of k_cache
  int num_pages, max_pages;  // pages per layer and block-table width
  int num_parts;             // rows of tile_metadata
  int q_rows;                // s_q * h_q / h_kv: query rows per head group
  float softmax_scale;
  bool causal;
};

// Each launcher checks its arguments' invariants, launches on `stream` and returns the launch's error.
cudaError_t launch_scheduler(const SchedulerParams& params, cudaStream_t stream);
cudaError_t launch_decode(const DecodeParams& params, ElementType type, cudaStream_t stream);
cudaError_t launch_combine(const DecodeParams& params, ElementType type, cudaStream_t stream);

}  // namespace jax_flashmla
