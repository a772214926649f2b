#!/usr/bin/env bash
# The start of a CTA (call 2's chunk timeline: ~10k cycles from the first chunk's loop top to its loads issued, the
# first Q landing ~15k cycles after the start): head against the tensor maps prefetched at the start (pf) and, in the
# seesaw, Q issued before the first pages with both block-table entries read first (pfq). b 128, then b 8.
cd "$(dirname "$0")/.."
t0=$SECONDS
L=/tmp/pf
ROUNDS=2 BOUNDARY_ROW=0 BENCH_ARGS="--batch 128 --seqlen 4096 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 280 scripts/compare_builds.sh $L head= pf=-DJFM_PREFETCH_TENSOR_MAPS pfq="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST" > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
python3 scripts/summarize_builds.py $L head pf pfq | tee $OUT/means_b128.txt
cp $L/summary.txt $OUT/summary_b128.txt
left=$((380 - SECONDS + t0)); ((left > 60)) || exit 0
L=/tmp/pf8
CHECK_TESTS=none ROUNDS=2 BOUNDARY_ROW=0 BENCH_ARGS="--batch 8 --seqlen 4096 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout $left scripts/compare_builds.sh $L head= pf=-DJFM_PREFETCH_TENSOR_MAPS pfq="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST" > $OUT/driver8.log 2>&1
echo "compare_builds b8 rc=$? t=$((SECONDS-t0))"
python3 scripts/summarize_builds.py $L head pf pfq | tee $OUT/means_b8.txt
cp $L/summary.txt $OUT/summary_b8.txt
