"""jax_flashmla: DeepSeek's FlashMLA for JAX.

Multi-head latent attention decode over a paged KV cache: Hopper CUDA kernels behind XLA FFI on GPUs, the
pure-JAX specification (reference.py) on every other platform.
"""

from ._extension import KernelsUnavailableWarning, kernels_available, kernels_built, why_kernels_unavailable
from .api import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata
from .cache import PagedKVCache
from .constants import PAGE_SIZE
from .exporting import export_disabled_checks
from .fp8_cache import dequantize_kv_cache, quantize_kv_cache
from .sharding import mesh_from_flag, shard_cache

__all__ = [
    "PAGE_SIZE",
    "KernelsUnavailableWarning",
    "PagedKVCache",
    "dequantize_kv_cache",
    "export_disabled_checks",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "kernels_available",
    "kernels_built",
    "mesh_from_flag",
    "quantize_kv_cache",
    "shard_cache",
    "why_kernels_unavailable",
]
__version__ = "0.1.0"
