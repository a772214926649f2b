"""`python -m jax_flashmla._check_build`: fail loudly when nvcc exists but the CUDA extension did not load,
so CI cannot pass on the reference alone while the kernels silently failed to build or import."""

import shutil
import sys

import jax_flashmla
from jax_flashmla._extension import kernels_built

if __name__ == "__main__":
    if kernels_built():
        print("jax_flashmla: CUDA extension built and registered")
    elif shutil.which("nvcc"):
        sys.exit(f"jax_flashmla: nvcc is on PATH but the CUDA extension is unavailable: "
                 f"{jax_flashmla.why_kernels_unavailable()}")
    else:
        print("jax_flashmla: no nvcc, so no CUDA extension; the pure-JAX reference serves every platform")
