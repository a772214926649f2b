// 16-bit element types: 4- and 8-wide loads/stores between shared/global memory and float registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace jax_flashmla {

template <typename T>
struct Element;

template <>
struct Element<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  __device__ static float2 to_float2(Pair v) { return __bfloat1622float2(v); }
  __device__ static Pair from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

template <>
struct Element<__half> {
  using Pair = __half2;
  __device__ static float2 to_float2(Pair v) { return __half22float2(v); }
  __device__ static Pair from_float2(float a, float b) { return __floats2half2_rn(a, b); }
};

// 8 consecutive 16-bit elements (one 16-byte vector) to floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float* out) {
  const auto* pairs = reinterpret_cast<const typename Element<T>::Pair*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Element<T>::to_float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ uint2 pack4(const float* in) {
  uint2 v;
  auto* pairs = reinterpret_cast<typename Element<T>::Pair*>(&v);
  pairs[0] = Element<T>::from_float2(in[0], in[1]);
  pairs[1] = Element<T>::from_float2(in[2], in[3]);
  return v;
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* in) {
  uint4 v;
  auto* pairs = reinterpret_cast<typename Element<T>::Pair*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = Element<T>::from_float2(in[2 * i], in[2 * i + 1]);
  return v;
}

}  // namespace jax_flashmla
