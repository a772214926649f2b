#!/usr/bin/env bash
# The combine at small batches (NOTES 2.24 Next 3): head against cb (-DJFM_COMBINE_BATCHED: CTAs with nothing to
# merge leave before the wait, the splits' loads issued four at a time). The check subset with the dependent
# combine's tests, three alternating rounds of the b 8 rows, two of the b 128 s_k 4096 rows; then Nsight Compute
# durations of the decode and combine kernels of each build (serialized under ncu) at b 8.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/cb
CHECK_TESTS="64-2-4096-128-1 or 6-4-140-16 or hostile or all_empty or dependent" ROUNDS=3 BOUNDARY_ROW=0 \
  BENCH_ARGS="--batch 8 --seqlen 4096,16384 --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 300 scripts/compare_builds.sh $L head= cb="-DJFM_COMBINE_BATCHED" > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-150
python3 scripts/summarize_builds.py $L head cb | tee $OUT/means_b8.txt
base=$PYTHONPATH
L2=/tmp/cb128; mkdir -p $L2; r=0
for b in head cb cb head; do
  (( SECONDS - t0 < 430 )) || break
  r=$((r + 1)); d=bench_$b; [ $r -gt 2 ] && d=bench2_$b
  PYTHONPATH=/tmp/variant_$b:$base timeout 60 python3 -m jax_flashmla.bench --batch 128 --seqlen 4096 --s-q 1,2 \
    --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1 --out $L2/$d > $OUT/b128_${r}_$b.log 2>&1
done
python3 scripts/summarize_builds.py $L2 head cb | tee $OUT/means_b128.txt
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for b in head cb; do for hq in 16 128; do
  (( SECONDS - t0 < 540 )) || break
  PYTHONPATH=/tmp/variant_$b:$base timeout 50 ncu --kernel-name regex:'^(decode_kernel|combine_kernel)$' --launch-skip 6 \
    --launch-count 4 --metrics gpu__time_duration.sum,launch__registers_per_thread,launch__grid_size \
    python3 -m jax_flashmla.bench --no-baseline --warmup 1 --iters 5 --repeats 1 --causal off --batch 8 --seqlen 4096 \
    --s-q 1 --h-q $hq --out /tmp/cbn > $OUT/ncu_${b}_hq$hq.log 2>&1
  echo "== $b b 8 s_k 4096 s_q 1 h_q $hq rc=$?"
  grep -E 'decode_kernel|combine_kernel|gpu__time_duration|launch__registers' $OUT/ncu_${b}_hq$hq.log \
    | grep -v '^==' | sed -E 's/\(jax_flashmla::DecodeParams.*\) (\([0-9, ]*\)x\([0-9, ]*\)).*/ \1/; s/ +/ /g' | cut -c1-110
  echo
done; done
echo "t=$((SECONDS-t0))"
