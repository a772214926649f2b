#!/usr/bin/env bash
# Session 2026-12-05b, call 2 (carry [".whl", ".exp", ".fm"]): FlashMLA beside the default tree (its narrow kernel on
# the h_q 16 rows), then FlashMLA's grid at s_k 4096 and 16384 with the plain-XLA baseline.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" 2>/dev/null \
  || { python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"; }
timeout 260 python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16,2x16,2x128 --rounds 2 --out $OUT/ab \
  > $OUT/ab.log 2>&1; echo "flashmla_ab rc=$? t=$((SECONDS-t0))"; tail -n 14 $OUT/ab.log
for S in ${SKS:-4096 16384}; do
  timeout $((585 - SECONDS)) python3 -m jax_flashmla.bench --seqlen $S --repeats 3 --warmup 1 --baseline-iters 2 \
    --out $OUT/grid/b$S > $OUT/grid_b$S.txt 2>&1
  echo "s_k $S rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " $OUT/grid_b$S.txt
done
