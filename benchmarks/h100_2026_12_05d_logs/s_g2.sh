#!/usr/bin/env bash
# The new defaults (narrow ring of two pages asked for a page at a time; the combine as the decode's dependent):
# every GPU test, then FlashMLA's grid for benchmarks/h100.json, the JSON written after each s_k.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" || { tail -n 30 $OUT/build.log; exit 1; }
timeout 240 python3 -m pytest -q -m gpu -n 8 tests/ -p no:cacheprovider > /tmp/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$((SECONDS-t0)) $(tail -n 1 /tmp/gpu_tests.log)"; grep -E "^(FAILED|ERROR)" /tmp/gpu_tests.log | cut -c1-200 | head
grep -v "PytestBenchmarkWarning\|warnings.warn" /tmp/gpu_tests.log | tail -n 40 > $OUT/gpu_tests_tail.log
for S in 4096 8192 16384 32768; do
  ((SECONDS - t0 > ${DEADLINE:-430})) && { echo "deadline: s_k $S not run"; break; }
  timeout 90 python3 -m jax_flashmla.bench --seqlen $S --repeats 3 --warmup 1 --baseline-iters 2 \
    --out /tmp/grid/b$S > /tmp/grid_b$S.txt 2>&1
  echo "s_k $S rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " /tmp/grid_b$S.txt
  cat /tmp/grid_b*.txt > $OUT/grid_tables.txt
  python3 -c "
import json,glob; r=[x for f in sorted(glob.glob('/tmp/grid/b*/results.json')) for x in json.load(open(f))]
json.dump(r, open('$OUT/h100_grid.json','w'), indent=1); print(len(r), 'records')"
done
