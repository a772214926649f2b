#!/usr/bin/env bash
# Old (51a80aa, its own package from /tmp/old_src) against new at b 128 compute rows, alternating rounds.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS; L=/tmp/on; mkdir -p $L; base=$PYTHONPATH; repo=$PWD
ARGS="--batch 128 --seqlen 4096,16384 --s-q 2 --h-q 128 --causal off --no-baseline --repeats 3 --warmup 1"
run() { # NAME ROUND
  local d=$L/bench_$1; (($2 > 1)) && d=$L/bench$2_$1
  if [ $1 = old ]; then (cd /tmp/old_src && PYTHONPATH=/tmp/variant_old:$base timeout 60 python3 -m jax_flashmla.bench $ARGS --out $d > $d.log 2>&1)
  else PYTHONPATH=/tmp/variant_new:$base timeout 60 python3 -m jax_flashmla.bench $ARGS --out $d > $d.log 2>&1; fi
  echo "round $2 $1 rc=$? t=$((SECONDS-t0)) $(grep -E '^ *128' $d.log | awk '{print $7}' | tr '\n' ' ')"
}
for ((r = 1; r <= ${ROUNDS:-6}; r++)); do
  (( SECONDS - t0 < ${BUDGET:-150} )) || break
  if ((r % 2)); then run old $r; run new $r; else run new $r; run old $r; fi
done
grep -l "NOT kernel" $L/*.log
python3 scripts/summarize_builds.py $L old new | tee $OUT/means_on.txt
