// The walk over one part of the split-KV schedule (mla_params.h documents the metadata), shared by the
// decode kernels: which sequences the CTA of part grid_part() serves, which blocks and output slot of each,
// and the pages (and layer) behind the blocks.
#pragma once

#include "mla_params.h"

namespace jax_flashmla {

// What one CTA does for one sequence: blocks [block_begin, block_end) of it.
struct Chunk {
  int seq, block_begin, block_end, length;
  bool final_output;  // the sequence has one split: write out/lse directly
  int split;          // else: partial slot in o_accum/lse_accum
  bool skip;          // metadata inconsistent with these lengths: nothing to do
};

// Where a CTA sits in the decode grid (row blocks of 64 query rows, KV heads, parts). The row blocks come
// first, so the CTAs that read the same pages have consecutive ids and start side by side. Measured, this is
// within the run-to-run spread (benchmarks/NOTES.md).
__device__ __forceinline__ int grid_row_block() { return blockIdx.x; }
__device__ __forceinline__ int grid_row_blocks() { return gridDim.x; }
__device__ __forceinline__ int grid_part() { return blockIdx.z; }

// int32 arithmetic on metadata values, which may be anything (a schedule computed for other lengths, or garbage):
// two's-complement wrapping where signed overflow would be undefined (the unsigned result converts back modulo
// 2^32 with nvcc; C++20 defines it so). Whatever it yields is range-checked after.
__device__ __forceinline__ int wrapping_add(int a, int b) {
  return static_cast<int>(static_cast<unsigned>(a) + static_cast<unsigned>(b));
}
__device__ __forceinline__ int wrapping_sub(int a, int b) {
  return static_cast<int>(static_cast<unsigned>(a) - static_cast<unsigned>(b));
}

// Sequences first..last, one chunk each. Callers write the loop themselves (a callback per chunk was not
// inlined in the Hopper kernel, and its accumulators went to the stack).
struct PartWalk {
  int batch_begin, block_begin_first, batch_end, block_end_last, split_begin;
  int first, last;

  __device__ __forceinline__ explicit PartWalk(const DecodeParams& p) {
    const int32_t* md = p.tile_metadata + grid_part() * kMetadataRowInts;
    batch_begin = md[0], block_begin_first = md[1], batch_end = md[2], block_end_last = md[3];
    split_begin = md[4];
    first = max(batch_begin, 0);
    last = min(batch_end, p.batch - 1);
  }

  __device__ __forceinline__ Chunk chunk(const DecodeParams& p, int seq) const {
    Chunk c;
    c.seq = seq;
    c.length = min(max(p.cache_seqlens[seq], 0), p.max_pages * kPageSize);
    const int num_blocks = (c.length + kPageSize - 1) / kPageSize;
    c.block_begin = max(seq == batch_begin ? block_begin_first : 0, 0);
    c.block_end = max(min(seq == batch_end ? block_end_last : num_blocks, num_blocks), c.block_begin);
    const int first_split = p.num_splits[seq];
    const int n_splits = wrapping_sub(p.num_splits[seq + 1], first_split);
    c.final_output = n_splits == 1;
    c.split = wrapping_add(first_split, seq == batch_begin ? split_begin : 0);
    // A slot outside o_accum means metadata computed for other lengths.
    c.skip = !c.final_output && (c.split < 0 || c.split >= p.batch + p.num_parts);
    return c;
  }
};

__device__ __forceinline__ int page_of(const DecodeParams& p, int seq, int block) {
  return p.block_table[static_cast<size_t>(seq) * p.max_pages + block];
}

// The layer of k_cache to read. It lives on the device (a traced index under lax.scan may name it) and is
// clamped into [0, num_layers) (a negative one to 0: validation.clamp_layer, which the reference path and
// cache writes share), so no value can address memory outside the pool.
__device__ __forceinline__ int pool_layer(const DecodeParams& p) {
  return min(max(*p.layer_index, 0), p.num_layers - 1);
}

// Ids outside the pool mark tokens the kernels ignore: never loaded, masked out of S.
__device__ __forceinline__ bool page_in_pool(const DecodeParams& p, int page) {
  return page >= 0 && page < p.num_pages;
}

}  // namespace jax_flashmla
