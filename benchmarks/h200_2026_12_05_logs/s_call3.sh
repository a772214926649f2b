#!/usr/bin/env bash
# Session 2026-12-05, call 3: the narrow kernel as the default for <= 32 query rows (the combine kernel merges).
# Build; the small-head-group rows with the default and with the seesaw (alternating); then every GPU test.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 -m pip install -v --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
rows() { timeout 70 python3 -m jax_flashmla.bench --batch $1 --h-q 16,32 --s-q 1,2 --seqlen 4096,16384 --causal off \
  --no-baseline --out $OUT/$2 > $OUT/$2.log 2>&1; echo "$2 rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ " $OUT/$2.log; }
rows 128 default_b128
JAX_FLASHMLA_DECODE_KERNEL=seesaw rows 128 seesaw_b128
JAX_FLASHMLA_DECODE_KERNEL=seesaw rows 8 seesaw_b8
rows 8 default_b8
timeout $((420 - SECONDS)) python3 -m pytest -q -m gpu -n 8 --durations=5 tests/ > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$((SECONDS-t0))"; tail -12 $OUT/gpu_tests.log
