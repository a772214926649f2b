#!/usr/bin/env bash
# On an H100: FlashMLA's grid on the current defaults (the narrow kernel's splits charged 2; NOTES 2.22 Next 1) for
# benchmarks/h100.json, the JSON written after each s_k, while FlashMLA builds in the background; then FlashMLA beside
# the current kernels (version 2.21's Next 1). The GPU tests ran in the call before on the same tree (s_t2.sh).
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
python3 -c "import pathlib, sys; sys.path.insert(0, 'scripts'); import flashmla_ab; \
flashmla_ab.build_flashmla(pathlib.Path('.fm').resolve(), pathlib.Path('/tmp/flashmla_ab_build'), 10)" \
  > $OUT/build_flashmla.log 2>&1 &
fm=$!
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" || { tail -n 30 $OUT/build.log; exit 1; }
for S in 4096 8192 16384 32768; do
  ((SECONDS - t0 > 330)) && { echo "deadline: s_k $S not run"; break; }
  timeout 120 python3 -m jax_flashmla.bench --seqlen $S --repeats 3 --warmup 1 --baseline-iters 2 \
    --out /tmp/grid/b$S > /tmp/grid_b$S.txt 2>&1
  echo "s_k $S rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " /tmp/grid_b$S.txt
  cat /tmp/grid_b*.txt > $OUT/grid_tables.txt
  python3 -c "
import json,glob; r=[x for f in sorted(glob.glob('/tmp/grid/b*/results.json')) for x in json.load(open(f))]
json.dump(r, open('$OUT/h100_grid.json','w'), indent=1); print(len(r), 'records')"
done
wait $fm; echo "FlashMLA build rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/build_flashmla.log | cut -c1-120)"
left=$((570 - SECONDS + t0)); ((left > 60)) || exit 0
timeout $left python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16,2x16,2x128 --rounds 2 \
  --out /tmp/ab > /tmp/ab.log 2>&1
echo "A/B rc=$? t=$((SECONDS-t0))"; grep "^s_k" /tmp/ab.log; cp /tmp/ab.log /tmp/ab/flashmla_ab.json $OUT/ 2>/dev/null
