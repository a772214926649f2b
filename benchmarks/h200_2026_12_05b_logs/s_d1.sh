#!/usr/bin/env bash
# Session 2026-12-05b, call 1 (carry [".whl", ".exp", ".fm"]): the default tree's correctness: build, every GPU test,
# memcheck (all cases) and racecheck (small), the demo. FlashMLA's extension compiles beside the tests (for call 2).
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -m pip install -v --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable(); print('kernels ok')"
( cd scripts && nice -n 10 python3 -c "
from pathlib import Path; import flashmla_ab as f
f.build_flashmla(Path('../.fm').resolve(), Path('/tmp/flashmla_ab_build')); print('flashmla built')" \
  > $OUT/fm_build.log 2>&1; echo "flashmla build rc=$? t=$((SECONDS-t0))" >> $OUT/fm_build.log ) &
timeout 380 python3 -m pytest -q -m gpu -n 10 --durations=10 tests/ > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$((SECONDS-t0))"; grep -E "passed|failed|error" $OUT/gpu_tests.log | tail -3
grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | head -20
sanitize() {
  local try rc
  for try in 1 2 3; do
    compute-sanitizer --tool "$1" --error-exitcode 9 --kernel-name kns=jax_flashmla \
      python3 scripts/sanitize_cases.py "${@:2}"
    rc=$?; [ $rc -ne 139 ] && return $rc
  done; return $rc
}
timeout 120 bash -c "$(declare -f sanitize); sanitize memcheck" > $OUT/memcheck.log 2>&1
echo "memcheck rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/memcheck.log)"
timeout 60 bash -c "$(declare -f sanitize); sanitize racecheck small" > $OUT/racecheck.log 2>&1
echo "racecheck rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/racecheck.log)"
timeout 60 python3 -m jax_flashmla.demo --no-progress > $OUT/demo.log 2>&1
echo "demo rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/demo.log)"
wait; tail -n 3 $OUT/fm_build.log
