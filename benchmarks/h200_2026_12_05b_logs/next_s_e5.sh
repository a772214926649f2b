#!/usr/bin/env bash
# Next session (carry [".whl", ".exp"]): ptxas's --register-usage-level=10, the level FlashMLA's setup.py builds
# with (ours is the default, 5), against head on the memory and compute rows, 3 alternating rounds. Compiled
# locally: registers 251 (seesaw), 252 (narrow, 16 and 32 rows; 254 at 32 rows on head), no spills, the same
# instruction mix scheduled differently. About 7 minutes. Only 8 files of $OUT come back: summaries plus a tarball.
cd "$(dirname "$0")/.."
L=/tmp/rul
ROUNDS=3 BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16,128 --s-q 1,2 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 560 scripts/compare_builds.sh $L head= rul10=--ptxas-options=--register-usage-level=10 > $OUT/driver.log 2>&1
echo "compare_builds rc=$?"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
python3 scripts/summarize_builds.py $L head rul10 | tee $OUT/means.txt
cp $L/summary.txt $OUT/summary.txt; tar czf $OUT/logs.tgz -C $L .
