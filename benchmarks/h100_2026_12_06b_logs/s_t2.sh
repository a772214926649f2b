#!/usr/bin/env bash
# Next session's first call (carry [".whl", ".exp"]; copy this file to .exp/s_t2.sh), on any Hopper GPU. The
# narrow kernel's split charge of 2 as the default (NOTES.md version 2.22), whose FFI attribute no GPU has run: build, every GPU test (the forked-cache test and the
# scheduler-spec test with charges 1, 2 and 5 among them), then, if time is left, the memory rows (s_q 1, h_q 16)
# without the XLA baseline.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" || { tail -n 30 $OUT/build.log; exit 1; }
timeout 210 python3 -m pytest -q -m gpu -n 8 tests/ -rA > /tmp/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$((SECONDS-t0)) $(tail -n 1 /tmp/gpu_tests.log)"; grep -E "^(FAILED|ERROR)" /tmp/gpu_tests.log | head
grep -E "^PASSED.*(forked|metadata_kernel_matches)" /tmp/gpu_tests.log | head -4
grep -vE "^PASSED" /tmp/gpu_tests.log > $OUT/gpu_tests.log; grep -cE "^PASSED" /tmp/gpu_tests.log
left=$((340 - SECONDS + t0)); [ $left -gt 40 ] || exit 0
timeout $left python3 -m jax_flashmla.bench --h-q 16 --s-q 1 --seqlen 4096,8192,16384,32768 --causal off \
  --repeats 3 --warmup 1 --no-baseline --out /tmp/mem > $OUT/bench.txt 2>&1
echo "bench rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " $OUT/bench.txt; cp /tmp/mem/results.json $OUT/ 2>/dev/null
