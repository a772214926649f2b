// Host side of the Hopper kernels' TMA loads: the descriptors over the paged KV cache and over Q.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "mla_params.h"

namespace jax_flashmla {

// Describes k_cache (num_layers, num_pages*64 tokens, h_kv, 576) as a 4-D tensor whose (64 dims, 1 head,
// 64 tokens, 1 layer) boxes land in shared memory with the 128-byte swizzle the wgmma layouts expect. The driver's
// encoder is looked up through the runtime, so nothing links against libcuda.
cudaError_t make_kv_tensor_map(CUtensorMap* map, const DecodeParams& p, ElementType type);

// Describes q (b, s_q, h_q, 576) as (576 dims, g heads of a group, h_kv groups, b*s_q query tokens), so that one
// box per 64-dim tile brings a CTA's 64 query rows (r = s*g + j, mla_params.h) into shared memory, swizzled
// like the pages. That needs the rows of a 64-row block to be one box: g a multiple of 64 (box: 64 heads of one
// token) or a divisor of 64 (box: all g heads of min(s_q, 64/g) tokens). *box_bytes gets the bytes one box
// brings (rows the box leaves out are masked: no key is visible to them), or 0 where Q does not fit a box and
// the kernel loads it with cp.async instead.
cudaError_t make_q_tensor_map(CUtensorMap* map, const DecodeParams& p, ElementType type, int* box_bytes);

}  // namespace jax_flashmla
