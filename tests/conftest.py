import importlib.util
import os
import pathlib
import shutil

import jax
import pytest

# CPU tests compare against float64 NumPy oracles.
jax.config.update("jax_enable_x64", False)
# Where a GPU runs them, XLA would multiply float32 in TF32 (errors near 1e-3) unless asked for full precision. The
# kernels are custom calls, which this does not touch.
jax.config.update("jax_default_matmul_precision", "highest")


def gpu_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where JAX sees no GPU; where it does, they run (and fail if kernels are missing)."""
    if gpu_devices():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (JAX sees none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rng_seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed (JFM_SEED=...)."""
    seed = int(os.environ.get("JFM_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"\njax_flashmla test seed: JFM_SEED={seed}")
    return seed


@pytest.fixture(scope="session")
def trace_script():
    """scripts/trace_chunk_timeline.py as a module (scripts/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "trace_chunk_timeline.py"
    spec = importlib.util.spec_from_file_location("trace_chunk_timeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cuda_build_tools():
    """(nvcc, the nvidia-cutlass wheel's source root): what compiling the kernels needs; CI has both."""
    nvcc = shutil.which("nvcc")
    try:
        import cutlass_library
        cutlass = pathlib.Path(cutlass_library.__file__).parent / "source"
    except ImportError:
        cutlass = None
    if nvcc is None or cutlass is None or not (cutlass / "include" / "cute" / "tensor.hpp").exists():
        pytest.skip("needs nvcc and the nvidia-cutlass wheel (the CUDA build's requirements)")
    return pathlib.Path(nvcc), cutlass
