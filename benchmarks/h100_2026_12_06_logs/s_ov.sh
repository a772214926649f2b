#!/usr/bin/env bash
# Where the memory rows' fixed ~22 us goes (NOTES.md, version 2.22), and whether the scheduler's charge per split
# (5 blocks, set for the seesaw on 2026-11-23) costs the narrow kernel: head against a charge of 1 (2 rounds, h_q 16
# rows), then both under -DJFM_NARROW_STALLS, whose NARROW_CLOCKS line splits each decode's span into its start,
# the stream and the spread of the parts' ends. About 8 minutes.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
for v in "stalls5=-DJFM_NARROW_STALLS" "stalls1=-DJFM_NARROW_STALLS -DJFM_SCHEDULE_SPLIT_COST=1"; do
  name=${v%%=*}
  python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_$name \
    -C build-dir=/tmp/variant_build_$name -C "cmake.define.CMAKE_CUDA_FLAGS=${v#*=}" . > /tmp/build_$name.log 2>&1 &
done
L=/tmp/ov
CHECK_TESTS="narrow_head_groups and (narrow-16-1-1 or narrow-16-1-2)" ROUNDS=2 BOUNDARY_ROW=0 \
  BENCH_ARGS="--h-q 16 --s-q 1 --seqlen 4096,16384 --causal off --no-baseline --repeats 3 --warmup 1" \
  timeout 400 scripts/compare_builds.sh $L head= ov1=-DJFM_SCHEDULE_SPLIT_COST=1 > $OUT/driver.log 2>&1
echo "compare_builds rc=$? t=$((SECONDS-t0))"
grep -E "^[a-z0-9]+ +(build|check) " $L/summary.txt | cut -c1-160
python3 scripts/summarize_builds.py $L head ov1 | tee $OUT/means.txt
wait
for name in stalls5 stalls1; do
  PYTHONPATH=/tmp/variant_$name:$PYTHONPATH timeout 100 python3 -m jax_flashmla.bench --h-q 16 --s-q 1 \
    --seqlen 4096,16384 --causal off --no-baseline --repeats 1 --warmup 1 --out /tmp/b_$name > /tmp/$name.log 2>&1
  echo "$name rc=$? t=$((SECONDS-t0))"; grep -E "NARROW_CLOCKS" /tmp/$name.log | cut -c40-300 | head -30
done
cat /tmp/stalls5.log /tmp/stalls1.log > $OUT/stalls.log
cp $L/summary.txt $OUT/summary.txt; tar czf $OUT/logs.tgz -C $L .
