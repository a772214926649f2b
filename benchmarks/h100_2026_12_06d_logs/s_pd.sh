#!/usr/bin/env bash
# (1) The combine's share at b 8 as it runs: Nsight Compute durations of the decode and combine kernels with
# caches not flushed and clocks not locked (s_cb.sh's ncu flushed and locked both). (2) NOTES 2.24 Next 1: our
# compute row's full profile with clocks not locked, through the bench (scripts/profile_decode.sh).
cd "$(dirname "$0")/.."
if [ -d /tmp/variant_head ]; then source scripts/gpu_env.sh; export PYTHONPATH=/tmp/variant_head${PYTHONPATH:+:$PYTHONPATH}; t0=$SECONDS
else source scripts/device_build.sh; fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for hq in 16 128; do
  timeout 60 ncu --cache-control none --clock-control none --kernel-name regex:'^(decode_kernel|combine_kernel)$' \
    --launch-skip 6 --launch-count 6 --metrics gpu__time_duration.sum,sm__cycles_active.avg \
    python3 -m jax_flashmla.bench --no-baseline --warmup 1 --iters 5 --repeats 1 --causal off --batch 8 --seqlen 4096 \
    --s-q 1 --h-q $hq --out /tmp/cbn > $OUT/ncu_warm_hq$hq.log 2>&1
  echo "== head b 8 s_k 4096 s_q 1 h_q $hq, caches kept, clocks free: rc=$?"
  grep -E 'decode_kernel|combine_kernel|gpu__time_duration' $OUT/ncu_warm_hq$hq.log | grep -v '^==' \
    | sed -E 's/\(jax_flashmla::DecodeParams.*\) (\([0-9, ]*\)x\([0-9, ]*\)).*/ \1/; s/ +/ /g' | cut -c1-100
done
echo "t=$((SECONDS-t0))"
NCU_CLOCK_CONTROL=none PROFILE_ROWS=compute_bound timeout $((560 - SECONDS + t0)) scripts/profile_decode.sh /tmp/pd > $OUT/profile.log 2>&1
echo "profile rc=$? t=$((SECONDS-t0))"
tail -n 45 $OUT/profile.log
tar -czf $OUT/pd.tgz -C /tmp/pd $(cd /tmp/pd && ls *.txt *.csv *.log 2>/dev/null)
