#!/usr/bin/env bash
# Our kernels built with FlashMLA's ptxas flag (--register-usage-level=10; NOTES.md version 2.17): head against rul10,
# one bench round of the b 128, s_k 4096, s_q 2 rows (h_q 16, 128), then SM cycles of the compute row under Nsight
# Compute (clocks locked), one launch per build. Short: the session's last device seconds.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/rul
CHECK_TESTS=none ROUNDS=1 BOUNDARY_ROW=0 \
  BENCH_ARGS="--batch 128 --seqlen 4096 --s-q 2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 150 scripts/compare_builds.sh $L head= rul10="-Xptxas --register-usage-level=10" > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
grep -E "^[a-z0-9]+ +(build|bench) |^ +[0-9]" $L/summary.txt | cut -c1-120
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for b in head rul10; do
  (( SECONDS - t0 < 165 )) || break
  PYTHONPATH=/tmp/variant_$b:$PYTHONPATH timeout 35 ncu --kernel-name regex:^decode_kernel$ --launch-skip 3 --launch-count 1 \
    --metrics gpu__time_duration.sum,sm__cycles_active.avg,smsp__inst_executed.sum \
    python3 -m jax_flashmla.bench --no-baseline --warmup 1 --iters 3 --repeats 1 --causal off --batch 128 --seqlen 4096 \
    --s-q 2 --h-q 128 --out /tmp/ncu_r > $OUT/ncu_$b.log 2>&1
  echo "$b rc=$? $(grep -E 'gpu__time_duration.sum|sm__cycles_active.avg|smsp__inst_executed.sum' $OUT/ncu_$b.log | awk '{print $1"="$NF}' | tr '\n' ' ')"
done
echo "t=$((SECONDS-t0))"
