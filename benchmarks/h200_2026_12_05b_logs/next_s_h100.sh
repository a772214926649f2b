#!/usr/bin/env bash
# First call of a session lent an H100 (carry [".whl", ".exp"]): FlashMLA's grid with the current defaults, the
# issue's own measurement (benchmarks/h100.json is from 2026-11-23, the seesaw at every width, before the refill
# change and the narrow kernel). Four s_k, each one bench call with the plain-XLA baseline, merged into one JSON.
# About 8 minutes on the H200 (2026-12-05). Only 8 files of $OUT come back: the JSON, the tables, the build log.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" \
  || { tail -n 30 $OUT/build.log; exit 1; }
for S in 4096 8192 16384 32768; do
  timeout 150 python3 -m jax_flashmla.bench --seqlen $S --repeats 3 --warmup 1 --baseline-iters 2 \
    --out /tmp/grid/b$S > /tmp/grid_b$S.txt 2>&1
  echo "s_k $S rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " /tmp/grid_b$S.txt
  cat /tmp/grid_b*.txt > $OUT/grid_tables.txt
  python3 -c "
import json,glob; r=[x for f in sorted(glob.glob('/tmp/grid/b*/results.json')) for x in json.load(open(f))]
json.dump(r, open('$OUT/h100_grid.json','w'), indent=1); print(len(r), 'records')"
done
cat /tmp/grid_b*.txt > $OUT/grid_tables.txt

