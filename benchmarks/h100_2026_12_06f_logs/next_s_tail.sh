#!/usr/bin/env bash
# NOTES.md version 2.27, Next 0 (carry [".whl", ".exp"]; copy to .exp/s_tail.sh): the schedule's second wave
# (get_mla_metadata's tail_units, the bench's --tail-units), which no GPU has run yet. One build; first the CUDA
# scheduler against the spec with tails, the decode on tail schedules, the dependent combine and the hostile-id
# tests, and memcheck on the small sanitizer cases (two of them tail schedules); then alternating bench rounds
# (ROUNDS, default 3; BUDGET seconds, default 520) of tail 0 (today's schedule), 1, 2 and 4 units on b 128:
# the memory rows at s_k 4096, 8192, 16384 (m_*) and the compute rows at s_k 4096, 16384 (c_*).
cd "$(dirname "$0")/.."
source scripts/device_build.sh
L=/tmp/tail; mkdir -p $L
timeout 240 python3 -m pytest -q -m gpu -n 8 tests/test_gpu_kernels.py \
  -k "metadata_kernel_matches_spec or second_wave or dependent or hostile" > $OUT/tests.log 2>&1
echo "tests rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/tests.log)"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 --kernel-name kns=jax_flashmla \
  python3 scripts/sanitize_cases.py small > $OUT/memcheck.log 2>&1
echo "memcheck rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/memcheck.log)"
MEMORY="--batch 128 --seqlen 4096,8192,16384 --s-q 1 --h-q 16"
COMPUTE="--batch 128 --seqlen 4096,16384 --s-q 2 --h-q 128"
tails=(0 1 2 4)
for ((round = 1; round <= ${ROUNDS:-3}; round++)); do
  order=("${tails[@]}"); ((round % 2 == 0)) && order=(4 2 1 0)
  for t in "${order[@]}"; do
    for set in m c; do
      (( SECONDS - t0 < ${BUDGET:-520} )) || break 3
      args=$MEMORY; [ $set = c ] && args=$COMPUTE
      d=$L/bench_${set}_t$t; ((round > 1)) && d=$L/bench${round}_${set}_t$t
      timeout 60 python3 -m jax_flashmla.bench $args --causal off --no-baseline --repeats 3 --warmup 1 \
        --tail-units $t --out $d > $d.log 2>&1
      echo "round $round $set tail $t rc=$? t=$((SECONDS-t0)) $(grep -E '^ *128' $d.log | awk '{print $7}' | tr '\n' ' ')"
    done
  done
done
for set in m c; do python3 scripts/summarize_builds.py $L ${set}_t0 ${set}_t1 ${set}_t2 ${set}_t4 | tee -a $OUT/means.txt; done
cd $L && tar czf $OUT/logs.tgz *.log && cd - >/dev/null
