#!/usr/bin/env bash
# Next session, call 2 (carry [".whl", ".exp"]): how the narrow kernel asks for its pages (NOTES.md version 2.15,
# Next 2): head (25 slots at 16 rows, tiles issued as slots free) against a ring of two pages (FlashMLA's depth),
# the same with each page issued in one burst, and the full ring with half-page bursts. About 8 minutes.
cd "$(dirname "$0")/.."
CHECK_TESTS="narrow_head_groups and (narrow-16-1-1 or narrow-16-1-2)" ROUNDS=3 BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16 --s-q 1,2 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 570 scripts/compare_builds.sh $OUT/ring head= ring18=-DJFM_NARROW_RING_SLOTS=18 \
  r18b9="-DJFM_NARROW_RING_SLOTS=18 -DJFM_NARROW_LOAD_BURST=9" b5=-DJFM_NARROW_LOAD_BURST=5
tail -n 16 $OUT/ring/summary.txt
