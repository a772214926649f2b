#!/usr/bin/env bash
# Next session (carry [".whl", ".exp"]; NOTES.md version 2.21, Next 2): the narrow kernel's ring around the new
# default (18 slots, the least it allows, and a page per burst): deeper rings (22; 25 is all that fits at 16 rows,
# capped at 22 at 32 rows), and bursts of 5 and 3 tiles at 18 slots. 3 rounds on the h_q 16 rows. About 9 minutes.
cd "$(dirname "$0")/.."
L=/tmp/ring2
CHECK_TESTS="narrow_head_groups and (narrow-16-1-1 or narrow-16-1-2)" ROUNDS=3 BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16 --s-q 1,2 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 560 scripts/compare_builds.sh $L head= r22=-DJFM_NARROW_RING_SLOTS=22 \
  r25=-DJFM_NARROW_RING_SLOTS=25 b5=-DJFM_NARROW_LOAD_BURST=5 b3=-DJFM_NARROW_LOAD_BURST=3 > $OUT/driver.log 2>&1
echo "compare_builds rc=$?"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
python3 scripts/summarize_builds.py $L head r22 r25 b5 b3 | tee $OUT/means.txt
cp $L/summary.txt $OUT/summary.txt; tar czf $OUT/logs.tgz -C $L .
