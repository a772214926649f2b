// The environment variables the launchers read at every launch (so a test or a benchmark can switch them between
// calls; under CUDA graphs the captured choice stays):
//   JAX_FLASHMLA_DECODE_KERNEL  which Hopper decode kernel runs (decode_launch.cuh);
//   JAX_FLASHMLA_COMBINE        how a sequence's splits are merged: the combine kernel launched after the decode
//                               (unset or =separate), the same kernel launched as a programmatic dependent of the
//                               decode (=dependent, combine.cu), or the 16-row narrow kernel merging them itself
//                               (=in_kernel, decode_launch.cuh).
#pragma once

#include <cstdlib>
#include <cstring>

namespace jax_flashmla {

inline bool environment_says(const char* variable, const char* value) {
  const char* choice = std::getenv(variable);
  return choice != nullptr && std::strcmp(choice, value) == 0;
}

}  // namespace jax_flashmla
