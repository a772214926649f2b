#!/usr/bin/env bash
# Next session, only if s_e1.sh shows the dependent combine helping the seesaw's rows but not the narrow kernel's
# (carry [".whl", ".exp"]; NOTES.md version 2.15, Next 1): the narrow kernel releasing the dependent combine at
# its start (one combine CTA then waits beside it on every SM) against releasing it once its producer has asked
# for every page. About 5 minutes.
cd "$(dirname "$0")/.."
JAX_FLASHMLA_COMBINE=dependent CHECK_TESTS="dependent_combine" ROUNDS=3 BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16 --s-q 1,2 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 570 scripts/compare_builds.sh $OUT/late early= late=-DJFM_PDL_LATE_TRIGGER
tail -n 12 $OUT/late/summary.txt
