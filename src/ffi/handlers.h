// XLA FFI handler symbols exported to the nanobind module.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashmlaMetadata);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashmlaDecode);
