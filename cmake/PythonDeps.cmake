# Locate build inputs that ship inside Python wheels, by asking the interpreter that runs the build
# (never a copy of our own): nanobind's CMake package, the XLA FFI headers of the installed jax, and the
# CuTe/CUTLASS headers of the nvidia-cutlass wheel.

function(_jfm_python_query out_var code what)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${code}"
    OUTPUT_VARIABLE _value OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_VARIABLE _err RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0 OR _value STREQUAL "")
    set(${out_var} "" PARENT_SCOPE)
    message(STATUS "jax_flashmla: could not find ${what}: ${_err}")
  else()
    set(${out_var} "${_value}" PARENT_SCOPE)
  endif()
endfunction()

# nanobind: its CMake config dir.
function(jfm_find_nanobind)
  _jfm_python_query(_dir "import nanobind; print(nanobind.cmake_dir())" "nanobind")
  if(NOT _dir)
    message(FATAL_ERROR "jax_flashmla: nanobind is required to build (pip install nanobind)")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_dir}")
  set(CMAKE_PREFIX_PATH "${CMAKE_PREFIX_PATH}" PARENT_SCOPE)
endfunction()

# XLA FFI headers and the version of the jaxlib they come from. The handlers carry that jaxlib's FFI API
# version, so the package records it and checks it against the running jaxlib at import time.
function(jfm_find_xla_ffi)
  _jfm_python_query(_inc "import jax.ffi; print(jax.ffi.include_dir())" "jax (XLA FFI headers)")
  if(NOT _inc)
    message(FATAL_ERROR "jax_flashmla: jax must be installed in the build environment (its FFI headers)")
  endif()
  _jfm_python_query(_ver "import jaxlib; print(jaxlib.__version__)" "jaxlib version")
  set(JFM_XLA_FFI_INCLUDE_DIR "${_inc}" PARENT_SCOPE)
  set(JFM_BUILT_AGAINST_JAXLIB "${_ver}" PARENT_SCOPE)
  message(STATUS "jax_flashmla: XLA FFI headers from jaxlib ${_ver}: ${_inc}")
endfunction()

# CuTe/CUTLASS headers from the nvidia-cutlass wheel (no vendored copy).
function(jfm_find_cutlass)
  _jfm_python_query(_root
    "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"
    "the nvidia-cutlass wheel")
  if(_root AND EXISTS "${_root}/include/cute/tensor.hpp")
    set(JFM_CUTLASS_INCLUDE_DIRS "${_root}/include" "${_root}/tools/util/include" PARENT_SCOPE)
    message(STATUS "jax_flashmla: CuTe/CUTLASS headers: ${_root}/include")
  else()
    set(JFM_CUTLASS_INCLUDE_DIRS "" PARENT_SCOPE)
    message(STATUS "jax_flashmla: nvidia-cutlass wheel not found; building without CuTe headers")
  endif()
endfunction()
