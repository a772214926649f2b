// The environment variables the launchers read at every launch (so a test or a benchmark can switch them between
// calls; under CUDA graphs the captured choice stays):
//   JAX_FLASHMLA_DECODE_KERNEL  which Hopper decode kernel runs (decode_launch.cuh);
//   JAX_FLASHMLA_COMBINE        how the combine kernel, which merges a sequence's splits, is launched: as a
//                               programmatic dependent of the decode (unset or =dependent, combine.cu), or
//                               after the decode has finished (=separate);
//   JAX_FLASHMLA_COMBINE_SLICES how many warps merge one query row (=2 or =4; unset: by the schedule's shape,
//                               combine.cu).
#pragma once

#include <cstdlib>
#include <cstring>

namespace jax_flashmla {

inline bool environment_says(const char* variable, const char* value) {
  const char* choice = std::getenv(variable);
  return choice != nullptr && std::strcmp(choice, value) == 0;
}

}  // namespace jax_flashmla
