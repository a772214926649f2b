# Sourced (from the repository root) by the scripts that run the GPU tests and benchmarks on the lent machine:
# the environment they share, and the wheels that machine lacks.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# Each test shape compiles a fresh float32 reference; GEMM autotuning would cost seconds per shape.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
# Offline machines: wheels the image lacks (nvidia-cutlass), carried in .whl/, are installed to /tmp/site.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
