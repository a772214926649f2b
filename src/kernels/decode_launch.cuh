// Launches the split-KV decode kernel for one element type. Included once per type by decode_<type>.cu so
// the instantiations compile in parallel.
#pragma once

#include <mutex>

#include "kernels/decode_simt.cuh"

namespace jax_flashmla {

template <typename T>
cudaError_t launch_decode_typed(const DecodeParams& p, cudaStream_t stream) {
  if (p.head_dim % 8 != 0 || p.head_dim > simt::kMaxHeadDim || p.head_dim_v != simt::kHeadDimV ||
      p.h_kv < 1 || p.h_q % p.h_kv != 0 || p.num_parts < 1 || p.max_pages < 1 || p.q_rows < 1)
    return cudaErrorInvalidValue;
  constexpr int kSmem = sizeof(simt::SharedStorage);
  // The dynamic shared-memory limit is a per-device function attribute: raise it once per device.
  static std::once_flag flags[64];
  static cudaError_t status[64];
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  std::call_once(flags[device], [&] {
    status[device] = cudaFuncSetAttribute(simt::decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  });
  if (status[device] != cudaSuccess) return status[device];
  const dim3 grid(p.num_parts, p.h_kv, (p.q_rows + simt::kBlockM - 1) / simt::kBlockM);
  simt::decode_kernel<T><<<grid, simt::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_flashmla
