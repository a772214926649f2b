#!/usr/bin/env bash
# The start and the end of a decode (NOTES.md version 2.23, Next 0): head against the tensor maps prefetched at the
# start with, in the seesaw, Q issued before the first pages (pfq: JFM_PREFETCH_TENSOR_MAPS, JFM_Q_FIRST), and that
# with the combine's loads one split ahead (pfqc: JFM_COMBINE_LOADS_AHEAD). The check subset with the dependent
# combine's tests. b 128, then b 8, s_k 4096.
cd "$(dirname "$0")/.."
t0=$SECONDS
L=/tmp/pf
CHECK_TESTS="64-2-4096-128-1 or 6-4-140-16 or hostile or all_empty or dependent" \
  ROUNDS=2 BOUNDARY_ROW=0 BENCH_ARGS="--batch 128 --seqlen 4096 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 360 scripts/compare_builds.sh $L head= pfq="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST" \
  pfqc="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST -DJFM_COMBINE_LOADS_AHEAD" > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
python3 scripts/summarize_builds.py $L head pfq pfqc | tee $OUT/means_b128.txt
cp $L/summary.txt $OUT/summary_b128.txt
left=$((560 - SECONDS + t0)); ((left > 60)) || exit 0
L=/tmp/pf8
CHECK_TESTS=none ROUNDS=2 BOUNDARY_ROW=0 BENCH_ARGS="--batch 8 --seqlen 4096 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout $left scripts/compare_builds.sh $L head= pfq="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST" \
  pfqc="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST -DJFM_COMBINE_LOADS_AHEAD" > $OUT/driver8.log 2>&1
echo "compare_builds b8 rc=$? t=$((SECONDS-t0))"
python3 scripts/summarize_builds.py $L head pfq pfqc | tee $OUT/means_b8.txt
cp $L/summary.txt $OUT/summary_b8.txt
