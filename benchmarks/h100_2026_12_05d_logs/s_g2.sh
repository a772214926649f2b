#!/usr/bin/env bash
# The new defaults (narrow ring of two pages asked for a page at a time; the combine as the decode's dependent):
# every GPU test, then FlashMLA's grid for benchmarks/h100.json, the JSON written after each s_k.
cd "$(dirname "$0")/.."
source scripts/device_build.sh
timeout 240 python3 -m pytest -q -m gpu -n 8 tests/ -p no:cacheprovider > /tmp/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$((SECONDS-t0)) $(tail -n 1 /tmp/gpu_tests.log)"; grep -E "^(FAILED|ERROR)" /tmp/gpu_tests.log | cut -c1-200 | head
grep -v "PytestBenchmarkWarning\|warnings.warn" /tmp/gpu_tests.log | tail -n 40 > $OUT/gpu_tests_tail.log
scripts/device_grid.sh $OUT 90 $((${DEADLINE:-430} - SECONDS + t0))
