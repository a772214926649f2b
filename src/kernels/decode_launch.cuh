// Launches the split-KV decode for one element type: a Hopper kernel where it applies (sm_90, d = 576,
// dv = 512; the narrow kernel for head groups of at most 32 query rows and the seesaw schedule for wider ones,
// unless the environment picks another), the portable kernel otherwise. Included once per type by decode_<type>.cu
// so the instantiations compile in parallel.
#pragma once

#include <climits>
#include <mutex>

#include "kernels/decode_hopper.cuh"
#include "kernels/decode_narrow.cuh"
#include "kernels/decode_seesaw.cuh"
#include "kernels/decode_simt.cuh"
#include "kernels/launch_environment.h"
#include "kernels/tensor_maps.h"

namespace jax_flashmla {

constexpr int kMaxDevices = 64;

// The dynamic shared-memory limit is a per-device function attribute: raise it once per device.
template <auto Kernel, int kSmemBytes>
cudaError_t raise_smem_limit_once(int device) {
  static std::once_flag flags[kMaxDevices];
  static cudaError_t status[kMaxDevices];
  std::call_once(flags[device], [&] {
    status[device] = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  });
  return status[device];
}

// Launches Kernel with kSmemBytes of dynamic shared memory, having raised its limit on this device.
template <auto Kernel, int kThreads, int kSmemBytes, typename... Args>
cudaError_t launch_with_smem(int device, dim3 grid, cudaStream_t stream, const Args&... args) {
  if (cudaError_t err = raise_smem_limit_once<Kernel, kSmemBytes>(device); err != cudaSuccess) return err;
  Kernel<<<grid, kThreads, kSmemBytes, stream>>>(args...);
  return cudaGetLastError();
}

inline bool device_is_hopper(int device) {
  static std::once_flag flags[kMaxDevices];
  static bool hopper[kMaxDevices];
  std::call_once(flags[device], [&] {
    int major = 0, minor = 0;
    hopper[device] = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                     cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
                     major == 9 && minor == 0;
  });
  return hopper[device];
}

// On Hopper the tokens-as-M kernel (decode_narrow.cuh) runs for head groups of at most 32 query rows and the seesaw
// schedule (decode_seesaw.cuh) for wider ones (measured on the H200, benchmarks/RESULTS.md 2026-12-05: the narrow
// kernel 1-4% faster there at b 128, 3-14% at b 8). JAX_FLASHMLA_DECODE_KERNEL=seesaw runs the seesaw for every
// width, =hopper the older single-softmax kernel (decode_hopper.cuh), both kept to compare against; any other value
// (=narrow included) is the default (launch_environment.h).
inline bool decode_kernel_selected(const char* name) { return environment_says("JAX_FLASHMLA_DECODE_KERNEL", name); }

template <typename T>
constexpr ElementType element_type_of() {
  return std::is_same_v<T, __nv_bfloat16> ? ElementType::kBF16 : ElementType::kFP16;
}

// Launches the narrow kernel of width kN; the combine kernel merges its splits.
template <typename T, int kN>
cudaError_t launch_narrow(const DecodeParams& p, int device, dim3 grid, cudaStream_t stream, const CUtensorMap& kv_map) {
  cudaError_t err =
      launch_with_smem<narrow::decode_kernel<T, kN>, narrow::kThreads, narrow::smem_bytes<kN>()>(device, grid, stream,
                                                                                                p, kv_map);
#ifdef JFM_NARROW_STALLS  // the counters' printer then sits between the decode and the combine, which becomes its
                          // dependent instead: the dependent launch overlaps nothing in this build
  if (err == cudaSuccess) {
    narrow::print_stalls<<<1, 1, 0, stream>>>(kN, p.batch, p.num_parts);
    err = cudaGetLastError();
  }
#endif
  return err;
}

template <typename T>
cudaError_t launch_decode_typed(const DecodeParams& p, cudaStream_t stream) {
  if (p.head_dim % 8 != 0 || p.head_dim > simt::kMaxHeadDim || p.head_dim_v != simt::kHeadDimV ||
      p.h_kv < 1 || p.h_q % p.h_kv != 0 || p.num_parts < 1 || p.max_pages < 1 || p.q_rows < 1 || p.num_layers < 1 ||
      p.layer_index == nullptr)
    return cudaErrorInvalidValue;
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  static_assert(simt::kBlockM == kRowBlock && hopper::kBlockM == kRowBlock, "the kernels share one grid");
  const int row_blocks = (p.q_rows + kRowBlock - 1) / kRowBlock;
  const dim3 grid(row_blocks, p.h_kv, p.num_parts);  // the order part_walk.cuh's grid_* functions read

  // TMA coordinates are int32: the pool's token count must fit (it always does for real pools).
  const bool hopper_shape = p.head_dim == hopper::kHeadDim && p.head_dim_v == hopper::kHeadDimV && p.num_pages >= 1 &&
                            static_cast<long long>(p.num_pages) * kPageSize <= INT_MAX;
  if (hopper_shape && device_is_hopper(device)) {
    CUtensorMap kv_map;
    if (cudaError_t err = make_kv_tensor_map(&kv_map, p, element_type_of<T>()); err != cudaSuccess) return err;
    if (decode_kernel_selected("hopper"))
      return launch_with_smem<hopper::decode_kernel<T>, hopper::kThreads, hopper::kSmemBytes>(device, grid, stream, p,
                                                                                             kv_map);
    if (p.q_rows <= kNarrowMaxQueryRows && !decode_kernel_selected("seesaw"))
      return p.q_rows <= 16 ? launch_narrow<T, 16>(p, device, grid, stream, kv_map)
                            : launch_narrow<T, 32>(p, device, grid, stream, kv_map);
    CUtensorMap q_map{};  // unused where q_box_bytes is 0
    int q_box_bytes = 0;
    if (cudaError_t err = make_q_tensor_map(&q_map, p, element_type_of<T>(), &q_box_bytes); err != cudaSuccess)
      return err;
    return launch_with_smem<seesaw::decode_kernel<T>, seesaw::kThreads, seesaw::kSmemBytes>(device, grid, stream, p,
                                                                                           kv_map, q_map, q_box_bytes);
  }
  return launch_with_smem<simt::decode_kernel<T>, simt::kThreads, sizeof(simt::SharedStorage)>(device, grid, stream, p);
}

}  // namespace jax_flashmla
