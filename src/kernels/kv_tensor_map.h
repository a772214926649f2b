// Host side of the Hopper kernel's page loads: the TMA descriptor over the paged KV cache.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "mla_params.h"

namespace jax_flashmla {

// Describes k_cache (num_layers, num_pages*64 tokens, h_kv, 576) as a 4-D tensor whose (64 dims, 1 head,
// 64 tokens, 1 layer) boxes land in shared memory with the 128-byte swizzle the wgmma layouts expect. The driver's encoder is
// looked up through the runtime, so nothing links against libcuda.
cudaError_t make_kv_tensor_map(CUtensorMap* map, const DecodeParams& p, ElementType type);

}  // namespace jax_flashmla
