"""Loads the compiled CUDA extension, if any, and registers its FFI targets with XLA.

The extension is a top-level module (`_jax_flashmla_cuda`) so that a source checkout on sys.path still
finds the installed build. Whatever goes wrong here, the package keeps working on the pure-JAX
reference, and says why once.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import warnings

import jax
import jaxlib

# CMakeLists.txt builds every kernel for sm_90a alone: they load on compute capability 9.0 GPUs only.
KERNEL_COMPUTE_CAPABILITY = "9.0"
# Present in a source checkout only; an installed package comes with the extension built beside it.
HANDLERS_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "src" / "ffi" / "handlers.cc"


class KernelsUnavailableWarning(UserWarning):
    """The CUDA kernels are not in use; every platform runs the pure-JAX reference."""


def _load():
    try:
        import _jax_flashmla_cuda as ext  # noqa: PLC0415 (optional compiled module)
    except ImportError as err:
        return None, (f"the CUDA kernels were not built ({err}); install with nvcc on PATH to build them")
    return ext, (check_abi(ext.built_against_jaxlib(), jaxlib.__version__)
                 or check_handlers(getattr(ext, "handlers_sha256", lambda: None)(), HANDLERS_SOURCE))


def check_abi(built_against: str, running: str) -> str | None:
    """A handler carries the XLA FFI API version of its headers; XLA refuses one newer than its own."""
    if built_against != running:
        return (f"the CUDA kernels were built against jaxlib {built_against} but jaxlib {running} is running "
                "(XLA FFI handlers are tied to the jaxlib whose headers built them); rebuild with "
                "`pip install --no-build-isolation --force-reinstall .` in this environment")
    return None


def check_handlers(built_from_sha256: str | None, source: pathlib.Path) -> str | None:
    """A source checkout finds the installed extension (a top-level module). If that was built from other FFI
    handlers, its custom calls may take other operands or results than this checkout's primitives emit, which
    XLA would refuse only when a call runs on the GPU: refuse it here, naming the fix."""
    if not source.is_file():
        return None
    if built_from_sha256 == hashlib.sha256(source.read_bytes()).hexdigest():
        return None
    return (f"the installed CUDA extension was built from other FFI handlers than this checkout's {source} "
            f"(an older build?); rebuild with `pip install --no-build-isolation --force-reinstall .` here")


_ext, _why_not = _load()
if _why_not is None:
    for _name, _capsule in _ext.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
else:
    _ext = None
    warnings.warn(f"jax_flashmla: {_why_not}. Using the pure-JAX reference on every platform.",
                  KernelsUnavailableWarning, stacklevel=2)


def unsupported_gpus(devices) -> str | None:
    """Why the kernels cannot run on these JAX GPU devices, or None. A device that reports no compute
    capability is given the benefit of the doubt."""
    others = sorted({str(d.compute_capability) for d in devices if getattr(d, "compute_capability", None)}
                    - {KERNEL_COMPUTE_CAPABILITY})
    if not others:
        return None
    return (f"the CUDA kernels are built for compute capability {KERNEL_COMPUTE_CAPABILITY} (sm_90a, Hopper) "
            f"only, and this process's GPUs have {', '.join(others)}; the pure-JAX reference runs there")


@functools.lru_cache(maxsize=None)
def _local_gpu_problem() -> str | None:
    """unsupported_gpus of this process's GPUs; None without any (lowering for export targets Hopper)."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return unsupported_gpus(gpus)


def kernels_built() -> bool:
    """True when the CUDA extension is built, loadable, and registered for the `cuda` platform."""
    return _ext is not None


def kernels_available() -> bool:
    """True when the CUDA kernels are built and this process's GPUs (if any) can run them."""
    return kernels_built() and _local_gpu_problem() is None


def why_kernels_unavailable() -> str | None:
    return _why_not or (_local_gpu_problem() if _ext is not None else None)


# FFI target names; src/ffi/module.cc registers the handlers under the same names.
METADATA_TARGET = "jax_flashmla_mla_metadata"
DECODE_TARGET = "jax_flashmla_mla_decode"
