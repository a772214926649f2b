#!/usr/bin/env bash
# Session 2026-12-05b, call 3 (carry [".whl", ".exp"]): the grid's four s_k (JSON merged into one file), then
# version 2.11's hh (the seesaw's next chunk read once per chunk) against head on the compute rows.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" 2>/dev/null \
  || { python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"; }
for S in 4096 8192 16384 32768; do
  timeout 150 python3 -m jax_flashmla.bench --seqlen $S --repeats 3 --warmup 1 --baseline-iters 2 \
    --out /tmp/grid/b$S > $OUT/grid_b$S.txt 2>&1
  echo "s_k $S rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " $OUT/grid_b$S.txt
done
python3 -c "
import json,glob; r=[x for f in sorted(glob.glob('/tmp/grid/b*/results.json')) for x in json.load(open(f))]
json.dump(r, open('$OUT/h200_grid.json','w'), indent=1); print(len(r), 'records')"
git apply benchmarks/v2_11_prepared/hoist_next_chunk.patch && \
ROUNDS=2 BOUNDARY_ROW=0 BENCH_ARGS="--h-q 128 --s-q 2 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout $((590 - SECONDS)) scripts/compare_builds.sh $OUT/hh head= hh=-DJFM_HOIST_NEXT > $OUT/hh_driver.log 2>&1
echo "hh rc=$? t=$((SECONDS-t0))"; tail -n 14 $OUT/hh/summary.txt
