#!/usr/bin/env bash
# Chain shortening (NOTES 2.24 Next 2): head, uq (-DJFM_UNIFORM_Q_DESCRIPTORS: B's S with uniform Q descriptors) and
# ue (uq + -DJFM_STAGED_EPILOGUE: the output stores through p0). Each build: the check subset with the seesaw's
# narrow-group tests, one bench round of the s_k 4096 h_q 128 rows, the boundary row; then SM cycles under Nsight
# Compute (clocks locked) of the compute row and the boundary row per build; then racecheck and memcheck (small)
# on ue with the seesaw forced.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/ue
CHECK_TESTS="64-2-4096-128-1 or 6-4-140-16 or hostile or all_empty or (narrow_head_groups and seesaw)" \
  ROUNDS=1 BENCH_ARGS="--batch 128 --seqlen 4096 --s-q 1,2 --h-q 128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 330 scripts/compare_builds.sh $L head= uq="-DJFM_UNIFORM_Q_DESCRIPTORS" \
  ue="-DJFM_UNIFORM_Q_DESCRIPTORS -DJFM_STAGED_EPILOGUE" > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
grep -E "^[a-z0-9]+ +(build|check|bench|boundary) |^ +[0-9]" $L/summary.txt | cut -c1-150
cp $L/summary.txt $OUT/summary.txt
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cycles() {  # cycles BUILD NAME BENCH_FLAGS...
  local b=$1 n=$2; shift 2
  PYTHONPATH=/tmp/variant_$b timeout 80 ncu --kernel-name regex:^decode_kernel$ --launch-skip 3 --launch-count 2 \
    --metrics gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_active.max,smsp__inst_executed.sum \
    python3 -m jax_flashmla.bench --no-baseline --warmup 1 --iters 3 --repeats 1 --causal off --out /tmp/ncu_b "$@" \
    > $OUT/ncu_${n}_$b.log 2>&1
  echo "$b $n rc=$? $(grep -E 'gpu__time_duration.sum|sm__cycles_active.avg|sm__cycles_active.max|smsp__inst_executed.sum' $OUT/ncu_${n}_$b.log | awk '{print $1"="$NF}' | tr '\n' ' ')"
}
for b in head uq ue; do
  (( SECONDS - t0 < 470 )) || break
  cycles $b compute --batch 128 --seqlen 4096 --s-q 2 --h-q 128
  cycles $b boundary --batch 512 --seqlen 1024 --s-q 2 --h-q 128 --fixed-lengths
done
left=$((585 - SECONDS + t0))
if (( left > 40 )); then
  PYTHONPATH=/tmp/variant_ue JAX_FLASHMLA_DECODE_KERNEL=seesaw timeout $left compute-sanitizer --tool racecheck \
    --error-exitcode 9 --kernel-name kns=jax_flashmla python3 scripts/sanitize_cases.py small > $OUT/racecheck_ue.log 2>&1
  echo "racecheck ue rc=$? t=$((SECONDS-t0))"; tail -n 3 $OUT/racecheck_ue.log
fi
