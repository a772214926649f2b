#!/usr/bin/env bash
# The combine at small batches, second try (after s_cb.sh): head against ee (-DJFM_COMBINE_EARLY_EXIT: CTAs with
# nothing to merge leave before the wait), eb2 (ee, two splits' loads per round trip, at most 80 registers:
# -DJFM_COMBINE_BATCH=2 -DJFM_COMBINE_MIN_BLOCKS=3) and em (ee with -DJFM_COMBINE_MIN_BLOCKS=1: the default loop,
# which ptxas then batches itself at 120 registers with plain loads). Check subset with the dependent combine's
# tests; two alternating rounds of the b 8 rows.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/cb2
CHECK_TESTS="6-4-140-16 or hostile or all_empty or dependent" ROUNDS=2 BOUNDARY_ROW=0 \
  BENCH_ARGS="--batch 8 --seqlen 4096,16384 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 540 scripts/compare_builds.sh $L head= ee="-DJFM_COMBINE_EARLY_EXIT" \
  eb2="-DJFM_COMBINE_EARLY_EXIT -DJFM_COMBINE_BATCH=2 -DJFM_COMBINE_MIN_BLOCKS=3" \
  em="-DJFM_COMBINE_EARLY_EXIT -DJFM_COMBINE_MIN_BLOCKS=1" > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-150
python3 scripts/summarize_builds.py $L head ee eb2 em | tee $OUT/means_b8.txt
