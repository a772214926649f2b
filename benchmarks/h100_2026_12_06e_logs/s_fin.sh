#!/usr/bin/env bash
# The final combine (slices 2/4 by shape): build, every GPU kernel test, memcheck and racecheck, a b 8 check bench.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_fin \
  -C build-dir=/tmp/variant_build_new . > $OUT/build_fin.log 2>&1
echo "build rc=$? t=$((SECONDS-t0))"
export PYTHONPATH=/tmp/variant_fin:$PYTHONPATH
timeout 420 python3 -m pytest -q -m gpu -n 8 tests/test_gpu_kernels.py > $OUT/gpu_tests_fin.log 2>&1
echo "gpu tests rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/gpu_tests_fin.log)"
for tool in memcheck racecheck; do
  left=$((585 - SECONDS + t0)); (( left > 40 )) || break
  timeout $left compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=jax_flashmla \
    python3 scripts/sanitize_cases.py small > $OUT/${tool}_fin.log 2>&1
  echo "$tool rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/${tool}_fin.log)"
done
