// The Python extension: hands the FFI handlers to jax.ffi.register_ffi_target as capsules.
#include <nanobind/nanobind.h>

#include "ffi/handlers.h"

namespace nb = nanobind;

NB_MODULE(_jax_flashmla_cuda, m) {
  m.doc() = "jax_flashmla CUDA kernels behind XLA FFI handlers";
  m.def("registrations", [] {
    nb::dict targets;
    targets["jax_flashmla_mla_metadata"] = nb::capsule(reinterpret_cast<void*>(JaxFlashmlaMetadata));
    targets["jax_flashmla_mla_decode"] = nb::capsule(reinterpret_cast<void*>(JaxFlashmlaDecode));
    return targets;
  });
  m.def("built_against_jaxlib", [] { return JFM_BUILT_AGAINST_JAXLIB; },
        "The jaxlib whose XLA FFI headers this extension was compiled with.");
  m.def("handlers_sha256", [] { return JFM_HANDLERS_SHA256; },
        "SHA-256 of the src/ffi/handlers.cc this extension was compiled from.");
}
