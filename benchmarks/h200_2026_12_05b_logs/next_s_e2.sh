#!/usr/bin/env bash
# Next session, call 2 (carry [".whl", ".exp"]): how the narrow kernel asks for its pages (NOTES.md version 2.15,
# Next 2): head (25 slots at 16 rows, tiles issued as slots free) against a ring of two pages (FlashMLA's depth),
# the same with each page issued in one burst, and the full ring with half-page bursts. About 8 minutes.
# The step logs stay in /tmp (only 8 files of $OUT come back): $OUT gets the summary and a tarball of the logs.
cd "$(dirname "$0")/.."
L=/tmp/ring
CHECK_TESTS="narrow_head_groups and (narrow-16-1-1 or narrow-16-1-2)" ROUNDS=3 BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16 --s-q 1,2 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 550 scripts/compare_builds.sh $L head= ring18=-DJFM_NARROW_RING_SLOTS=18 \
  r18b9="-DJFM_NARROW_RING_SLOTS=18 -DJFM_NARROW_LOAD_BURST=9" b5=-DJFM_NARROW_LOAD_BURST=5 > $OUT/driver.log 2>&1
echo "compare_builds rc=$?"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
# Summarized here too, so that a run cut off by the timeout still shows the rounds it finished.
python3 scripts/summarize_builds.py $L head ring18 r18b9 b5 | tee $OUT/means.txt
cp $L/summary.txt $OUT/summary.txt; tar czf $OUT/logs.tgz -C $L .
