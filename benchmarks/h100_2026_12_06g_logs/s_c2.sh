#!/usr/bin/env bash
# memcheck and racecheck (small) again, each retried on a sanitizer crash (rc 139) as gpu_check.sh does; then Nsight
# Compute, clocks not locked, on the s_k 4096 memory and compute rows (profile_decode.sh) and on their combines.
cd "$(dirname "$0")/.."
source scripts/device_build.sh
for tool in memcheck racecheck; do
  for try in 1 2 3; do
    timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=jax_flashmla \
      python3 scripts/sanitize_cases.py small > $OUT/${tool}_$try.log 2>&1
    rc=$?
    echo "$tool try $try rc=$rc t=$((SECONDS-t0)): $(tail -n 1 $OUT/${tool}_$try.log)"
    [ $rc -ne 139 ] && break
  done
done
P=/tmp/prof; mkdir -p $P
(( SECONDS - t0 < 330 )) && NCU_CLOCK_CONTROL=none timeout 200 bash scripts/profile_decode.sh $P > $OUT/profile.txt 2>&1
echo "profile rc=$? t=$((SECONDS-t0))"
for row in memory compute; do
  (( SECONDS - t0 < 500 )) || break
  args="--s-q 1 --h-q 16"; [ $row = compute ] && args="--s-q 2 --h-q 128"
  timeout 70 ncu --kernel-name regex:combine --launch-skip 3 --launch-count 1 --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats \
    python3 -m jax_flashmla.bench --no-baseline --warmup 1 --iters 3 --repeats 1 --causal off --seqlen 4096 \
    $args --out $P/bench_comb_$row > $P/ncu_combine_$row.txt 2>&1
  echo "combine $row rc=$? t=$((SECONDS-t0))"
done
cd $P && tar czf $OUT/profile.tgz *.txt *.csv *.log 2>/dev/null; cd - > /dev/null
