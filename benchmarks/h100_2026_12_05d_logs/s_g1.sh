#!/usr/bin/env bash
# The candidate defaults (ring 18 slots, bursts of 9; the combine as the decode's dependent) built by flags:
# the narrow tests, memcheck and racecheck with the dependent launch (narrow, seesaw), the grid's h_q 16 and 128 rows.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps -C "cmake.define.CMAKE_CUDA_FLAGS=-DJFM_NARROW_RING_SLOTS=18 -DJFM_NARROW_LOAD_BURST=9" . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" || { tail -n 30 $OUT/build.log; exit 1; }
export JAX_FLASHMLA_COMBINE=dependent
timeout 200 python3 -m pytest -q -m gpu -n 8 tests/test_gpu_kernels.py -k "narrow or dependent or hostile or paged or zero or poison" > $OUT/tests.log 2>&1
echo "tests rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/tests.log)"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head
for kernel in narrow seesaw; do for tool in memcheck racecheck; do
  JAX_FLASHMLA_DECODE_KERNEL=$kernel timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=jax_flashmla \
    python3 scripts/sanitize_cases.py small > /tmp/san_${kernel}_$tool.log 2>&1
  echo "$kernel $tool rc=$? t=$((SECONDS-t0)) $(tail -n 1 /tmp/san_${kernel}_$tool.log)"
done; done
cat /tmp/san_*.log > $OUT/sanitizers.log
timeout $((560 - SECONDS + t0)) python3 -m jax_flashmla.bench --h-q 16,128 --s-q 1,2 --seqlen 4096,16384 --no-baseline --repeats 3 --warmup 1 --out /tmp/g1b > $OUT/bench.txt 2>&1
echo "bench rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " $OUT/bench.txt; cp /tmp/g1b/results.json $OUT/ 2>/dev/null
