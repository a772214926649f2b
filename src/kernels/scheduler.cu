// Split-KV scheduler: the CUDA twin of jax_flashmla/scheduler.py (that file explains the algorithm; the GPU
// tests check both produce identical integers, and tests/host/scheduler_walk.cu runs the same walk on the host
// against it). One CTA: the threads stage the lengths in shared memory and sum the costs; one thread then walks
// the sequences in order, which is O(b + num_parts) and a few microseconds for realistic batches.
#include "mla_params.h"

namespace jax_flashmla {
namespace {

constexpr int kSchedulerThreads = 256;
constexpr int kStageInts = 4096;  // lengths staged per round

// Lengths are clipped to max_blocks pages first, so that nothing below overflows int32 (scheduler.py).
__host__ __device__ __forceinline__ int blocks_of(int seqlen, int max_blocks) {
  return (min(max(seqlen, 0), max_blocks * kPageSize) + kPageSize - 1) / kPageSize;
}

// Part p holds the line's units [p S, (p + 1) S), S = part_size.
struct Walker {
  int32_t* metadata;
  int part_size;

  __host__ __device__ int32_t* row(int part) const { return metadata + part * kMetadataRowInts; }
  // Part `part`'s first sequence is `seq` (first block at unit `first_unit`, first part `first`).
  __host__ __device__ void set_begin(int part, int seq, int first_unit, int first) const {
    row(part)[0] = seq;
    row(part)[1] = max(part * part_size - first_unit, 0);
    row(part)[4] = part - first;
  }
  // Part `part`'s last sequence is `seq` (n blocks, first block at unit `first_unit`).
  __host__ __device__ void set_end(int part, int seq, int n, int first_unit) const {
    row(part)[2] = seq;
    row(part)[3] = min(n, (part + 1) * part_size - first_unit);
  }
};

// The sequential walk over the sequences in order (thread 0 of the kernel; the host test runs it too), carried
// across the kernel's staging rounds. `total` is the line's length: every sequence's blocks and charge.
struct SequenceWalk {
  Walker walk;
  int32_t* num_splits;
  int batch, num_parts, split_overhead, max_blocks;
  int start = 0, splits = 0, next_begin = 0, next_end = 0, prev_n = 0, prev_first_unit = 0;

  __host__ __device__ SequenceWalk(const SchedulerParams& p, int total)
      // The part size is at least 1: total >= batch * split_overhead.
      : walk{p.tile_metadata, (total + p.num_parts - 1) / p.num_parts}, num_splits(p.num_splits), batch(p.batch),
        num_parts(p.num_parts), split_overhead(p.split_overhead), max_blocks(max_scheduled_blocks(p.batch)) {}

  __host__ __device__ void add(int seq, int seqlen) {
    const int n = blocks_of(seqlen, max_blocks);
    const int first_unit = start + split_overhead;
    const int first = (first_unit - (n == 0 ? 1 : 0)) / walk.part_size;
    const int last = (first_unit + n - 1) / walk.part_size;
    splits += last - first + 1;
    num_splits[seq + 1] = splits;
    for (; next_begin <= last; ++next_begin) walk.set_begin(next_begin, seq, first_unit, first);
    for (; next_end < first; ++next_end) walk.set_end(next_end, seq - 1, prev_n, prev_first_unit);
    start += n + split_overhead;
    prev_n = n;
    prev_first_unit = first_unit;
  }

  // After the last sequence: the parts past the line's end hold nothing ([batch, 0, batch - 1, 0, 0] once
  // idle_row has run).
  __host__ __device__ void finish() {
    for (; next_begin < num_parts; ++next_begin) walk.row(next_begin)[0] = batch;
    for (; next_end < num_parts; ++next_end) walk.set_end(next_end, batch - 1, prev_n, prev_first_unit);
  }
};

// Idle parts (no sequence to work on) get the canonical row [begin, 0, end, 0, 0, ...].
__host__ __device__ __forceinline__ void idle_row(int32_t* r) {
  if (r[0] > r[2]) r[1] = r[3] = r[4] = 0;
}

__global__ void __launch_bounds__(kSchedulerThreads) scheduler_kernel(SchedulerParams p) {
  __shared__ int staged[kStageInts];
  __shared__ int partial_cost[kSchedulerThreads];

  const int max_blocks = max_scheduled_blocks(p.batch);
  int cost = 0;
  for (int i = threadIdx.x; i < p.batch; i += blockDim.x)
    cost += blocks_of(p.cache_seqlens[i], max_blocks) + p.split_overhead;
  partial_cost[threadIdx.x] = cost;
  __syncthreads();
  for (int stride = kSchedulerThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial_cost[threadIdx.x] += partial_cost[threadIdx.x + stride];
    __syncthreads();
  }
  SequenceWalk walk(p, partial_cost[0]);

  for (int i = threadIdx.x; i < p.num_parts * kMetadataRowInts; i += blockDim.x) p.tile_metadata[i] = 0;
  __syncthreads();

  if (threadIdx.x == 0) p.num_splits[0] = 0;
  for (int base = 0; base < p.batch; base += kStageInts) {
    const int count = min(kStageInts, p.batch - base);
    for (int i = threadIdx.x; i < count; i += blockDim.x) staged[i] = p.cache_seqlens[base + i];
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < count; ++k) walk.add(base + k, staged[k]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) walk.finish();
  __syncthreads();
  for (int part = threadIdx.x; part < p.num_parts; part += blockDim.x)
    idle_row(p.tile_metadata + part * kMetadataRowInts);
}

#ifdef JFM_SCHEDULER_ON_HOST
// The kernel's schedule computed by one host thread, for tests/host/scheduler_walk.cu (which defines the macro and
// includes this file): the same walk, so the same integers. Not compiled into the library.
void schedule_on_host(const SchedulerParams& p) {
  const int max_blocks = max_scheduled_blocks(p.batch);
  int total = 0;
  for (int i = 0; i < p.batch; ++i) total += blocks_of(p.cache_seqlens[i], max_blocks) + p.split_overhead;
  SequenceWalk walk(p, total);
  for (int i = 0; i < p.num_parts * kMetadataRowInts; ++i) p.tile_metadata[i] = 0;
  p.num_splits[0] = 0;
  for (int seq = 0; seq < p.batch; ++seq) walk.add(seq, p.cache_seqlens[seq]);
  walk.finish();
  for (int part = 0; part < p.num_parts; ++part) idle_row(p.tile_metadata + part * kMetadataRowInts);
}
#endif

// What launch_scheduler (and the host test) refuses.
bool scheduler_params_valid(const SchedulerParams& params) {
  return params.batch >= 1 && params.batch <= kMaxScheduledBatch && params.num_parts >= 1 &&
         params.num_parts <= kMaxScheduleParts && params.split_overhead >= 1 &&
         params.split_overhead <= kSplitOverheadBlocks;
}

}  // namespace

cudaError_t launch_scheduler(const SchedulerParams& params, cudaStream_t stream) {
  if (!scheduler_params_valid(params)) return cudaErrorInvalidValue;
  scheduler_kernel<<<1, kSchedulerThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
