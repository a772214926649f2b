// Split-KV scheduler: the CUDA twin of jax_flashmla/scheduler.py (that file explains the algorithm, the second
// wave of tail parts included; the GPU tests check both produce identical integers, and tests/host/
// scheduler_walk.cu runs the same walk on the host against it). One CTA: the threads stage the lengths in shared
// memory and sum the costs; one thread then walks the sequences in order, which is O(b + num_parts) and a few
// microseconds for realistic batches.
#include "mla_params.h"

namespace jax_flashmla {
namespace {

constexpr int kSchedulerThreads = 256;
constexpr int kStageInts = 4096;  // lengths staged per round

// Lengths are clipped to max_blocks pages first, so that nothing below overflows int32 (scheduler.py).
__host__ __device__ __forceinline__ int blocks_of(int seqlen, int max_blocks) {
  return (min(max(seqlen, 0), max_blocks * kPageSize) + kPageSize - 1) / kPageSize;
}

// Where the line's units go. Without a second wave (kTail false) piece r is part r, units [r S, (r + 1) S). With
// one (scheduler.py) each part's last `tail` units are a piece of their own: the pieces alternate on the line,
// part p's big piece (rank 2p) then its tail (rank 2p + 1, metadata row num_parts + p). Splits and the walk
// below go by rank.
template <bool kTail>
struct Walker {
  int32_t* metadata;
  int part_size;
  int tail;       // units each part hands to its tail part; 0 where the line is too short (part_size < 2)
  int num_parts;  // the first wave's parts

  __host__ __device__ bool split_parts() const { return kTail && tail > 0; }
  __host__ __device__ int pieces() const { return split_parts() ? 2 * num_parts : num_parts; }
  __host__ __device__ int rank(int unit) const {
    const int part = unit / part_size;
    if (!split_parts()) return part;
    return 2 * part + (unit - part * part_size >= part_size - tail ? 1 : 0);
  }
  __host__ __device__ int piece_begin(int r) const {
    if (!split_parts()) return r * part_size;
    return (r / 2) * part_size + (r % 2) * (part_size - tail);
  }
  __host__ __device__ int piece_end(int r) const {
    if (!split_parts()) return (r + 1) * part_size;
    return r % 2 == 0 ? (r / 2 + 1) * part_size - tail : (r / 2 + 1) * part_size;
  }
  __host__ __device__ int32_t* row(int r) const {
    const int metadata_row = !split_parts() ? r : (r % 2 == 0 ? r / 2 : num_parts + r / 2);
    return metadata + metadata_row * kMetadataRowInts;
  }
  // Piece r's first sequence is `seq` (first block at unit `first_unit`, first piece `first`).
  __host__ __device__ void set_begin(int r, int seq, int first_unit, int first) const {
    row(r)[0] = seq;
    row(r)[1] = max(piece_begin(r) - first_unit, 0);
    row(r)[4] = r - first;
  }
  // Piece r's last sequence is `seq` (n blocks, first block at unit `first_unit`).
  __host__ __device__ void set_end(int r, int seq, int n, int first_unit) const {
    row(r)[2] = seq;
    row(r)[3] = min(n, piece_end(r) - first_unit);
  }
};

// The schedule's shape once the total cost is known: the first wave's part size, and each part's tail.
template <bool kTail>
__host__ __device__ Walker<kTail> make_walker(const SchedulerParams& p, int total) {
  const int parts = kTail ? p.num_parts / 2 : p.num_parts;  // the first wave; launch_scheduler checked the rows
  const int even_part = (total + parts - 1) / parts;        // at least 1: total >= batch * split_overhead
  return Walker<kTail>{p.tile_metadata, even_part, kTail ? min(p.tail_units, even_part / 2) : 0, parts};
}

// The sequential walk over the sequences in order (thread 0 of the kernel; the host test runs it too), carried
// across the kernel's staging rounds. next_begin and next_end are piece ranks.
template <bool kTail>
struct SequenceWalk {
  Walker<kTail> walk;
  int32_t* num_splits;
  int batch, num_rows, split_overhead, max_blocks;
  int start = 0, splits = 0, next_begin = 0, next_end = 0, prev_n = 0, prev_first_unit = 0;

  __host__ __device__ SequenceWalk(const Walker<kTail>& w, const SchedulerParams& p)
      : walk(w), num_splits(p.num_splits), batch(p.batch), num_rows(p.num_parts), split_overhead(p.split_overhead),
        max_blocks(max_scheduled_blocks(p.batch)) {}

  __host__ __device__ void add(int seq, int seqlen) {
    const int n = blocks_of(seqlen, max_blocks);
    const int first_unit = start + split_overhead;
    const int first = walk.rank(first_unit - (n == 0 ? 1 : 0));
    const int last = walk.rank(first_unit + n - 1);
    splits += last - first + 1;
    num_splits[seq + 1] = splits;
    for (; next_begin <= last; ++next_begin) walk.set_begin(next_begin, seq, first_unit, first);
    for (; next_end < first; ++next_end) walk.set_end(next_end, seq - 1, prev_n, prev_first_unit);
    start += n + split_overhead;
    prev_n = n;
    prev_first_unit = first_unit;
  }

  // After the last sequence: the pieces past the line's end, and the tail rows of a line too short to cut
  // (tail 0), hold no piece and are left idle ([batch, 0, batch - 1, 0, 0] once idle_row has run).
  __host__ __device__ void finish() {
    const int pieces = walk.pieces();
    for (; next_begin < pieces; ++next_begin) walk.row(next_begin)[0] = batch;
    for (; next_end < pieces; ++next_end) walk.set_end(next_end, batch - 1, prev_n, prev_first_unit);
    if constexpr (kTail) {
      for (int r = pieces; r < num_rows; ++r) {
        walk.metadata[r * kMetadataRowInts] = batch;
        walk.metadata[r * kMetadataRowInts + 2] = batch - 1;
      }
    }
  }
};

// Idle parts (no sequence to work on) get the canonical row [begin, 0, end, 0, 0, ...].
__host__ __device__ __forceinline__ void idle_row(int32_t* r) {
  if (r[0] > r[2]) r[1] = r[3] = r[4] = 0;
}

template <bool kTail>
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
  SequenceWalk<kTail> walk(make_walker<kTail>(p, partial_cost[0]), p);

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

// The kernel's schedule computed by one host thread, for tests/host/scheduler_walk.cu (which includes this file):
// the same walk, so the same integers. Not instantiated in the library.
template <bool kTail>
void schedule_on_host(const SchedulerParams& p) {
  const int max_blocks = max_scheduled_blocks(p.batch);
  int total = 0;
  for (int i = 0; i < p.batch; ++i) total += blocks_of(p.cache_seqlens[i], max_blocks) + p.split_overhead;
  SequenceWalk<kTail> walk(make_walker<kTail>(p, total), p);
  for (int i = 0; i < p.num_parts * kMetadataRowInts; ++i) p.tile_metadata[i] = 0;
  p.num_splits[0] = 0;
  for (int seq = 0; seq < p.batch; ++seq) walk.add(seq, p.cache_seqlens[seq]);
  walk.finish();
  for (int part = 0; part < p.num_parts; ++part) idle_row(p.tile_metadata + part * kMetadataRowInts);
}

// What launch_scheduler (and the host test) refuses: with a second wave the rows are the parts, then their tails.
bool scheduler_params_valid(const SchedulerParams& params) {
  return params.batch >= 1 && params.batch <= kMaxScheduledBatch && params.num_parts >= 1 &&
         params.num_parts <= kMaxScheduleParts && params.split_overhead >= 1 &&
         params.split_overhead <= kSplitOverheadBlocks && params.tail_units >= 0 &&
         params.tail_units <= kMaxTailUnits && (params.tail_units == 0 || params.num_parts % 2 == 0);
}

}  // namespace

cudaError_t launch_scheduler(const SchedulerParams& params, cudaStream_t stream) {
  if (!scheduler_params_valid(params)) return cudaErrorInvalidValue;
  if (params.tail_units > 0)
    scheduler_kernel<true><<<1, kSchedulerThreads, 0, stream>>>(params);
  else
    scheduler_kernel<false><<<1, kSchedulerThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
