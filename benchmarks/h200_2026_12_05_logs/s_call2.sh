#!/usr/bin/env bash
# Session 2026-12-05, call 2: the narrow kernel's stall counters (short), then version 2.10's A/B.
cd "$(dirname "$0")/.."
t0=$SECONDS
JAX_FLASHMLA_DECODE_KERNEL=narrow JAX_FLASHMLA_COMBINE=separate CHECK_TESTS=none BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16 --s-q 1,2 --seqlen 4096,16384 --no-baseline --repeats 1" \
  timeout 150 scripts/compare_builds.sh "$OUT/stalls" stalls=-DJFM_NARROW_STALLS > $OUT/stalls_driver.log 2>&1
echo "stalls rc=$? t=$((SECONDS-t0))"
grep -h NARROW_STALLS "$OUT"/stalls/*.log | head -40
git checkout -- src
timeout $((575 - SECONDS)) bash .exp/s_next2.sh > $OUT/next2_driver.log 2>&1
echo "next2 rc=$? t=$((SECONDS-t0))"
tail -40 $OUT/next2_driver.log
