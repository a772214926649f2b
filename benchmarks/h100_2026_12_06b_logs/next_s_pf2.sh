#!/usr/bin/env bash
# s_pf.sh cut to the device time left: head against pfqc (the tensor maps prefetched, the seesaw's Q first, the combine's loads ahead), no check
# subset, b 8 then (time allowing) b 128, s_k 4096, 2 rounds each in alternating order.
cd "$(dirname "$0")/.."
t0=$SECONDS
L=/tmp/pf8
CHECK_TESTS=none ROUNDS=2 BOUNDARY_ROW=0 BENCH_ARGS="--batch 8 --seqlen 4096 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 170 scripts/compare_builds.sh $L head= pfqc="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST -DJFM_COMBINE_LOADS_AHEAD" > $OUT/driver8.log 2>&1
echo "compare_builds b8 rc=$? t=$((SECONDS-t0))"
python3 scripts/summarize_builds.py $L head pfqc | tee $OUT/means_b8.txt
cp $L/summary.txt $OUT/summary_b8.txt
left=$((205 - SECONDS + t0)); ((left > 40)) || exit 0
L=/tmp/pf
CHECK_TESTS=none ROUNDS=2 BOUNDARY_ROW=0 BENCH_ARGS="--batch 128 --seqlen 4096 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout $left scripts/compare_builds.sh $L head= pfqc="-DJFM_PREFETCH_TENSOR_MAPS -DJFM_Q_FIRST -DJFM_COMBINE_LOADS_AHEAD" > $OUT/driver.log 2>&1
echo "compare_builds b128 rc=$? t=$((SECONDS-t0))"
python3 scripts/summarize_builds.py $L head pfqc | tee $OUT/means_b128.txt
cp $L/summary.txt $OUT/summary_b128.txt
