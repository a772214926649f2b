#include "kernels/tensor_maps.h"

#include <cudaTypedefs.h>
#include <mutex>

namespace jax_flashmla {

namespace {
PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found) ==
            cudaSuccess &&
        found == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  return fn;
}

constexpr cuuint64_t kElementBytes = 2;

// A 4-D tensor of 16-bit elements at `base` whose boxes (64 elements innermost: one swizzle atom) land in shared
// memory with the 128-byte swizzle the wgmma layouts expect.
CUresult encode_swizzled_4d(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap* map, ElementType type,
                            const void* base, const cuuint64_t (&dims)[4], const cuuint64_t (&strides)[3],
                            const cuuint32_t (&box)[4]) {
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  return encode(map, type == ElementType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                4, const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}
}  // namespace

cudaError_t make_kv_tensor_map(CUtensorMap* map, const DecodeParams& p, ElementType type) {
  const auto encode = encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t tokens = static_cast<cuuint64_t>(p.num_pages) * kPageSize;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(p.h_kv), tokens,
                              static_cast<cuuint64_t>(p.num_layers)};
  const cuuint64_t token_bytes = static_cast<cuuint64_t>(p.h_kv) * p.head_dim * kElementBytes;
  const cuuint64_t strides[3] = {p.head_dim * kElementBytes, token_bytes, tokens * token_bytes};
  const cuuint32_t box[4] = {64, 1, kPageSize, 1};
  const CUresult result = encode_swizzled_4d(encode, map, type, p.k_cache, dims, strides, box);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t make_q_tensor_map(CUtensorMap* map, const DecodeParams& p, ElementType type, int* box_bytes) {
  *box_bytes = 0;
  const int group = p.h_q / p.h_kv;
  const bool one_box = group % 64 == 0 || 64 % group == 0;
  const auto encode = encoder();
  if (!one_box || p.batch < 1 || reinterpret_cast<uintptr_t>(p.q) % 16 != 0 || encode == nullptr) return cudaSuccess;
  const cuuint32_t heads = group >= 64 ? 64 : group;
  const cuuint32_t tokens = group >= 64 ? 1 : (p.s_q < 64 / group ? p.s_q : 64 / group);
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(group),
                              static_cast<cuuint64_t>(p.h_kv), static_cast<cuuint64_t>(p.batch) * p.s_q};
  const cuuint64_t head_bytes = static_cast<cuuint64_t>(p.head_dim) * kElementBytes;
  const cuuint64_t strides[3] = {head_bytes, group * head_bytes, static_cast<cuuint64_t>(p.h_q) * head_bytes};
  const cuuint32_t box[4] = {64, heads, 1, tokens};
  const CUresult result = encode_swizzled_4d(encode, map, type, p.q, dims, strides, box);
  if (result != CUDA_SUCCESS) return cudaErrorInvalidValue;
  *box_bytes = static_cast<int>(64 * kElementBytes * heads * tokens);
  return cudaSuccess;
}

}  // namespace jax_flashmla
