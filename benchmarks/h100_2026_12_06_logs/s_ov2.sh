#!/usr/bin/env bash
# The split charge on every kind of row: head (5) against 2 and 1, h_q 16 (narrow), 64 and 128 (seesaw), 2 rounds.
cd "$(dirname "$0")/.."
L=/tmp/ov2
CHECK_TESTS="narrow_head_groups and (narrow-16-1-1 or narrow-16-1-2)" ROUNDS=2 BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16,64,128 --s-q 1,2 --seqlen 4096,8192 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 540 scripts/compare_builds.sh $L head= ov2=-DJFM_SCHEDULE_SPLIT_COST=2 ov1=-DJFM_SCHEDULE_SPLIT_COST=1 > $OUT/driver.log 2>&1
echo "compare_builds rc=$?"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
python3 scripts/summarize_builds.py $L head ov2 ov1 | tee $OUT/means.txt
cp $L/summary.txt $OUT/summary.txt
