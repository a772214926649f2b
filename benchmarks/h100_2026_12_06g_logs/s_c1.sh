#!/usr/bin/env bash
# The tree with the second wave removed: every GPU test (all four marked files), memcheck and racecheck (small).
cd "$(dirname "$0")/.."
source scripts/device_build.sh
timeout 360 python3 -m pytest -q -m gpu -n 8 tests/test_gpu_kernels.py tests/test_paging.py tests/test_sparse.py \
  tests/test_device_timing.py > $OUT/gpu_tests.log 2>&1
echo "tests rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/gpu_tests.log)"
for tool in memcheck racecheck; do
  timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=jax_flashmla \
    python3 scripts/sanitize_cases.py small > $OUT/$tool.log 2>&1
  echo "$tool rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/$tool.log)"
done
