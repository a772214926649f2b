#!/usr/bin/env bash
# NOTES.md version 2.26, Next 2 (carry [".whl", ".exp"]; copy to .exp/s_minpart.sh): small batches cut into fewer
# splits. Builds the tree as is (head) and with -DJFM_MIN_PART_UNITS=8 and =16 (the CUDA scheduler's parts at least
# that many units; the spec does not know it, so no spec test runs on them); the dependent-combine and hostile
# tests on each; then ROUNDS (default 2) alternating rounds at b 1, 2, 4 and 8, s_k 4096 and 16384, s_q 1,
# h_q 16 and 128.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/minpart; mkdir -p $L
base=$PYTHONPATH
variants=(head min8 min16)
if ! compgen -G "/tmp/variant_min16/_jax_flashmla_cuda*" >/dev/null; then
  for v in "${variants[@]}"; do
    flags=; [ $v != head ] && flags=-DJFM_MIN_PART_UNITS=${v#min}
    rm -rf /tmp/variant_$v
    python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_$v \
      -C build-dir=/tmp/variant_build_$v -C "cmake.define.CMAKE_CUDA_FLAGS=$flags" . > $L/build_$v.log 2>&1 &
  done
  wait
  echo "builds t=$((SECONDS-t0)): $(ls /tmp/variant_head /tmp/variant_min8 /tmp/variant_min16 | grep -c _jax_flashmla_cuda)"
  for v in min8 min16; do
    PYTHONPATH=/tmp/variant_$v:$base timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_gpu_kernels.py \
      -k "dependent or hostile or 6-4-140-16 or 8-2048" > $OUT/check_$v.log 2>&1
    echo "check $v rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/check_$v.log)"
  done
fi
for ((round = 1; round <= ${ROUNDS:-2}; round++)); do
  order=("${variants[@]}"); ((round % 2 == 0)) && order=(min16 min8 head)
  for b in 1 2 4 8; do
    for v in "${order[@]}"; do
      (( SECONDS - t0 < ${BUDGET:-400} )) || break 3
      d=$L/bench_b${b}_$v; ((round > 1)) && d=$L/bench${round}_b${b}_$v
      PYTHONPATH=/tmp/variant_$v:$base timeout 100 python3 -m jax_flashmla.bench --batch $b --seqlen 4096,16384 \
        --s-q 1 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1 --out $d > $d.log 2>&1
      echo "round $round b $b $v rc=$? t=$((SECONDS-t0))"
    done
  done
done
for b in 1 2 4 8; do
  mkdir -p $L/b$b; for f in $L/bench*_b${b}_*; do [ -d "$f" ] && ln -sfn "$f" "$L/b$b/$(basename "$f" | sed "s/_b${b}_/_/")"; done
  python3 scripts/summarize_builds.py $L/b$b "${variants[@]}" | tee -a $OUT/means.txt
done
cd $L && tar czf $OUT/logs.tgz *.log && cd - >/dev/null
