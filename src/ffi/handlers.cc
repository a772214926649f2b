// XLA FFI handlers: check the buffers XLA hands us against each other, fill the plain params struct, and
// launch the kernels on XLA's stream. No allocation, no synchronisation (CUDA-graph compatible); every CUDA
// error becomes an FFI error, never an abort. Shapes were validated at trace time in Python; the checks
// here guard the kernels against a custom call built by other means.
#include "ffi/handlers.h"

#include <cuda_runtime_api.h>

#include <string>

#include "mla_params.h"

namespace ffi = xla::ffi;

namespace jax_flashmla {
namespace {

ffi::Error cuda_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_flashmla: ") + what + ": " + cudaGetErrorString(err));
}

std::string dims_to_string(ffi::Span<const int64_t> dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + ")";
}

ffi::Error MetadataImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> cache_seqlens,
                        ffi::ResultBuffer<ffi::S32> tile_metadata, ffi::ResultBuffer<ffi::S32> num_splits,
                        int32_t split_overhead) {
  const auto md_dims = tile_metadata->dimensions();
  const int64_t batch = cache_seqlens.element_count();
  if (md_dims.size() != 2 || md_dims[1] != kMetadataRowInts || num_splits->element_count() != batch + 1 || batch < 1)
    return ffi::Error::InvalidArgument("jax_flashmla metadata: inconsistent shapes, tile_metadata " +
                                       dims_to_string(md_dims) + " for " + std::to_string(batch) + " sequences");
  if (batch > kMaxScheduledBatch || md_dims[0] < 1 || md_dims[0] > kMaxScheduleParts)
    return ffi::Error::InvalidArgument("jax_flashmla metadata: the scheduler counts in int32 and takes at most " +
                                       std::to_string(kMaxScheduledBatch) + " sequences and " +
                                       std::to_string(kMaxScheduleParts) + " parts, got " + std::to_string(batch) +
                                       " and " + std::to_string(md_dims[0]));
  if (split_overhead < 1 || split_overhead > kSplitOverheadBlocks)
    return ffi::Error::InvalidArgument("jax_flashmla metadata: split_overhead must be in [1, " +
                                       std::to_string(kSplitOverheadBlocks) + "], got " +
                                       std::to_string(split_overhead));
  SchedulerParams params{cache_seqlens.typed_data(), tile_metadata->typed_data(), num_splits->typed_data(),
                         static_cast<int>(batch), static_cast<int>(md_dims[0]), split_overhead};
  return cuda_error(launch_scheduler(params, stream), "scheduler launch");
}

ffi::Error DecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::Buffer<ffi::S32> block_table,
                      ffi::Buffer<ffi::S32> cache_seqlens, ffi::Buffer<ffi::S32> tile_metadata,
                      ffi::Buffer<ffi::S32> num_splits, ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out,
                      ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> o_accum,
                      ffi::ResultBuffer<ffi::F32> lse_accum, float softmax_scale, bool causal,
                      bool poison_outputs) {
  const auto qd = q.dimensions(), bd = block_table.dimensions();
  const auto od = out->dimensions(), md = tile_metadata.dimensions();
  // k_cache is one layer's pool (num_pages, 64, h_kv, d), or a stacked pool (num_layers, num_pages, 64, h_kv, d)
  // whose layer `layer` (a device scalar) the kernels read in place, with no slice for XLA to copy.
  const auto all_kd = k_cache.dimensions();
  if (all_kd.size() != 4 && all_kd.size() != 5)
    return ffi::Error::InvalidArgument("jax_flashmla decode: k_cache must have rank 4 or 5");
  const int64_t num_layers = all_kd.size() == 5 ? all_kd[0] : 1;
  const auto kd = all_kd.last(4);
  if (qd.size() != 4 || bd.size() != 2 || od.size() != 4 || md.size() != 2 || layer.element_count() != 1)
    return ffi::Error::InvalidArgument("jax_flashmla decode: unexpected ranks");
  const int64_t batch = qd[0], s_q = qd[1], h_q = qd[2], head_dim = qd[3];
  const int64_t h_kv = kd[2], head_dim_v = od[3], num_parts = md[0];
  const ffi::DataType type = q.element_type();
  if ((type != ffi::DataType::BF16 && type != ffi::DataType::F16) || k_cache.element_type() != type ||
      out->element_type() != type)
    return ffi::Error::InvalidArgument("jax_flashmla decode: q, k_cache and out must all be bf16 or all fp16");
  if (num_layers < 1 || kd[1] != kPageSize || kd[3] != head_dim || h_kv < 1 || h_q % h_kv != 0 || bd[0] != batch ||
      cache_seqlens.element_count() != batch || num_splits.element_count() != batch + 1 ||
      bd[1] < 1 || bd[1] > kMaxPagesPerSeq || md[1] != kMetadataRowInts || od[0] != batch || od[1] != s_q ||
      od[2] != h_q)
    return ffi::Error::InvalidArgument("jax_flashmla decode: inconsistent shapes, q " + dims_to_string(qd) +
                                       ", k_cache " + dims_to_string(all_kd) + ", block_table " + dims_to_string(bd));
  // A block table wider than the scheduler counts would leave blocks unread (validation.py says so at trace time).
  if (batch < 1 || batch > kMaxScheduledBatch || bd[1] > max_scheduled_blocks(static_cast<int>(batch)))
    return ffi::Error::InvalidArgument("jax_flashmla decode: block_table " + dims_to_string(bd) +
                                       " is wider than the split-KV scheduler counts for this batch");
  const int64_t q_rows = s_q * h_q / h_kv;
  // Launch grids: parts and KV heads are z and y dimensions (the combine loops over rows beyond its z dimension).
  if (num_parts < 1 || num_parts > kMaxScheduleParts || h_kv > kMaxGridYZ || q_rows > kMaxQueryRows)
    return ffi::Error::InvalidArgument("jax_flashmla decode: beyond CUDA's grid limits, tile_metadata " +
                                       dims_to_string(md) + ", q " + dims_to_string(qd) + ", h_kv " +
                                       std::to_string(h_kv));
  if (o_accum->element_count() != (batch + num_parts) * h_kv * q_rows * head_dim_v ||
      lse_accum->element_count() != (batch + num_parts) * h_kv * q_rows || lse->element_count() != batch * h_q * s_q)
    return ffi::Error::InvalidArgument("jax_flashmla decode: split-KV buffers do not match the schedule");

  if (poison_outputs) {  // testing aid: NaN everywhere, so an element the kernels skip cannot pass for right
    for (auto [ptr, bytes] : {std::pair<void*, size_t>{out->untyped_data(), out->size_bytes()},
                              {lse->untyped_data(), lse->size_bytes()},
                              {o_accum->untyped_data(), o_accum->size_bytes()},
                              {lse_accum->untyped_data(), lse_accum->size_bytes()}})
      if (auto e = cuda_error(cudaMemsetAsync(ptr, 0xFF, bytes, stream), "poisoning outputs"); e.failure()) return e;
  }

  DecodeParams p{};
  p.q = q.untyped_data();
  p.k_cache = k_cache.untyped_data();
  p.layer_index = layer.typed_data();
  p.block_table = block_table.typed_data();
  p.cache_seqlens = cache_seqlens.typed_data();
  p.tile_metadata = tile_metadata.typed_data();
  p.num_splits = num_splits.typed_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  p.o_accum = o_accum->typed_data();
  p.lse_accum = lse_accum->typed_data();
  p.batch = static_cast<int>(batch);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.head_dim = static_cast<int>(head_dim);
  p.head_dim_v = static_cast<int>(head_dim_v);
  p.num_layers = static_cast<int>(num_layers);
  p.num_pages = static_cast<int>(kd[0]);
  p.max_pages = static_cast<int>(bd[1]);
  p.num_parts = static_cast<int>(num_parts);
  p.q_rows = static_cast<int>(q_rows);
  p.softmax_scale = softmax_scale;
  p.causal = causal;
  const ElementType element = type == ffi::DataType::BF16 ? ElementType::kBF16 : ElementType::kFP16;
  if (auto e = cuda_error(launch_decode(p, element, stream), "split-KV decode launch"); e.failure()) return e;
  return cuda_error(launch_combine(p, element, stream), "combine launch");
}

}  // namespace
}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaMetadata, jax_flashmla::MetadataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("split_overhead"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashmlaDecode, jax_flashmla::DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cache_seqlens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // tile_metadata
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_splits
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer: () int32, the layer of k_cache to read
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o_accum
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse_accum
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("poison_outputs"),
                              {ffi::Traits::kCmdBufferCompatible});
