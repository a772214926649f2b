#!/usr/bin/env bash
# NOTES.md version 2.25, Next 0 (carry [".whl", ".exp"]; copy to .exp/s_em.sh): the combine experiment "em"
# (-DJFM_COMBINE_EARLY_EXIT -DJFM_COMBINE_MIN_BLOCKS=1) against head before it becomes the default: two
# alternating rounds of the memory and compute rows at s_k 4096 and 16384 (BATCH, default 128), then, unless
# SKIP_TESTS=1, every GPU kernel test and compute-sanitizer's memcheck and racecheck (small cases) on the em build.
# Two calls: `bash .exp/s_em.sh`, then `BATCH=8 SKIP_TESTS=1 bash .exp/s_em.sh`.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/em
CHECK_TESTS=none ROUNDS=${ROUNDS:-2} BOUNDARY_ROW=0 \
  BENCH_ARGS="--batch ${BATCH:-128} --seqlen 4096,16384 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 330 scripts/compare_builds.sh $L head= em="-DJFM_COMBINE_EARLY_EXIT -DJFM_COMBINE_MIN_BLOCKS=1" \
  > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
python3 scripts/summarize_builds.py $L head em | tee $OUT/means_b${BATCH:-128}.txt
[ "${SKIP_TESTS:-0}" = 1 ] && exit 0
export PYTHONPATH=/tmp/variant_em${PYTHONPATH:+:$PYTHONPATH}
timeout $((500 - SECONDS + t0)) python3 -m pytest -q -m gpu -n 4 tests/test_gpu_kernels.py > $OUT/gpu_tests_em.log 2>&1
echo "gpu tests (em) rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/gpu_tests_em.log)"
for tool in memcheck racecheck; do
  left=$((585 - SECONDS + t0)); (( left > 30 )) || break
  timeout $left compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=jax_flashmla \
    python3 scripts/sanitize_cases.py small > $OUT/${tool}_em.log 2>&1
  echo "$tool (em) rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/${tool}_em.log)"
done
