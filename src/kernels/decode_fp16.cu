#include "kernels/decode_launch.cuh"

namespace jax_flashmla {
cudaError_t launch_decode_fp16(const DecodeParams& p, cudaStream_t stream) {
  return launch_decode_typed<__half>(p, stream);
}
}  // namespace jax_flashmla
