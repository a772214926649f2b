// Split-KV scheduler: the CUDA twin of jax_flashmla/scheduler.py (that file explains the algorithm; the GPU
// tests check both produce identical integers). One CTA: the threads stage the lengths in shared memory and
// sum the costs; one thread then walks the sequences in order, which is O(b + num_parts) and a few
// microseconds for realistic batches.
#include "mla_params.h"

namespace jax_flashmla {
namespace {

constexpr int kSchedulerThreads = 256;
constexpr int kStageInts = 4096;  // lengths staged per round

// Lengths are clipped to max_blocks pages first, so that nothing below overflows int32 (scheduler.py).
__device__ __forceinline__ int blocks_of(int seqlen, int max_blocks) {
  return (min(max(seqlen, 0), max_blocks * kPageSize) + kPageSize - 1) / kPageSize;
}

struct Walker {
  int32_t* metadata;
  int part_size;

  __device__ int32_t* row(int part) const { return metadata + part * kMetadataRowInts; }
  // Part `part`'s first sequence is `seq` (n blocks, first block at unit `first_unit`, first part `first`).
  __device__ void set_begin(int part, int seq, int n, int first_unit, int first) const {
    (void)n;
    row(part)[0] = seq;
    row(part)[1] = max(part * part_size - first_unit, 0);
    row(part)[4] = part - first;
  }
  __device__ void set_end(int part, int seq, int n, int first_unit) const {
    row(part)[2] = seq;
    row(part)[3] = min(n, (part + 1) * part_size - first_unit);
  }
};

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
  const int total = partial_cost[0];
  const int even_part = (total + p.num_parts - 1) / p.num_parts;  // at least 1: total >= batch * split_overhead
  const Walker walk{p.tile_metadata, even_part};

  for (int i = threadIdx.x; i < p.num_parts * kMetadataRowInts; i += blockDim.x) p.tile_metadata[i] = 0;
  __syncthreads();

  // Thread 0's walk state, carried across staging rounds.
  int start = 0, splits = 0, next_begin = 0, next_end = 0, prev_n = 0, prev_first_unit = 0;
  if (threadIdx.x == 0) p.num_splits[0] = 0;
  for (int base = 0; base < p.batch; base += kStageInts) {
    const int count = min(kStageInts, p.batch - base);
    for (int i = threadIdx.x; i < count; i += blockDim.x) staged[i] = p.cache_seqlens[base + i];
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < count; ++k) {
        const int seq = base + k;
        const int n = blocks_of(staged[k], max_blocks);
        const int first_unit = start + p.split_overhead;
        const int first = (first_unit - (n == 0 ? 1 : 0)) / walk.part_size;
        const int last = (first_unit + n - 1) / walk.part_size;
        splits += last - first + 1;
        p.num_splits[seq + 1] = splits;
        for (; next_begin <= last; ++next_begin) walk.set_begin(next_begin, seq, n, first_unit, first);
        for (; next_end < first; ++next_end) walk.set_end(next_end, seq - 1, prev_n, prev_first_unit);
        start += n + p.split_overhead;
        prev_n = n;
        prev_first_unit = first_unit;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (; next_begin < p.num_parts; ++next_begin) walk.row(next_begin)[0] = p.batch;
    for (; next_end < p.num_parts; ++next_end) walk.set_end(next_end, p.batch - 1, prev_n, prev_first_unit);
  }
  __syncthreads();
  // Idle parts (no sequence to work on) get the canonical row [begin, 0, end, 0, 0, ...].
  for (int part = threadIdx.x; part < p.num_parts; part += blockDim.x) {
    int32_t* r = walk.row(part);
    if (r[0] > r[2]) r[1] = r[3] = r[4] = 0;
  }
}

}  // namespace

cudaError_t launch_scheduler(const SchedulerParams& params, cudaStream_t stream) {
  if (params.batch < 1 || params.batch > kMaxScheduledBatch || params.num_parts < 1 ||
      params.num_parts > kMaxScheduleParts || params.split_overhead < 1 || params.split_overhead > kSplitOverheadBlocks)
    return cudaErrorInvalidValue;
  scheduler_kernel<<<1, kSchedulerThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
