#!/usr/bin/env bash
# Next session, only if s_e1.sh shows the dependent combine helping the seesaw's rows but not the narrow kernel's
# (carry [".whl", ".exp"]; NOTES.md version 2.15, Next 1): the narrow kernel releasing the dependent combine at
# its start (one combine CTA then waits beside it on every SM) against releasing it once its producer has asked
# for every page, at b 128 and at b 8 (where the combine's share is largest). About 7 minutes.
# The step logs stay in /tmp (only 8 files of $OUT come back): $OUT gets the summaries and a tarball of the logs.
cd "$(dirname "$0")/.."
for b in 128 8; do
  L=/tmp/late_b$b
  JAX_FLASHMLA_COMBINE=dependent CHECK_TESTS=$([ $b = 128 ] && echo dependent_combine || echo none) ROUNDS=3 \
    BOUNDARY_ROW=0 BENCH_ARGS="--batch $b --h-q 16 --s-q 1,2 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
    timeout $([ $b = 128 ] && echo 330 || echo 220) scripts/compare_builds.sh $L early= late=-DJFM_PDL_LATE_TRIGGER \
    > $OUT/driver_b$b.log 2>&1
  echo "b $b compare_builds rc=$?"
  grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
  python3 scripts/summarize_builds.py $L early late | tee $OUT/means_b$b.txt
  tar czf $OUT/logs_b$b.tgz -C $L .
done
