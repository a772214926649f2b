#!/usr/bin/env bash
# The combine with loads ahead and sliced rows (this session) against head: builds, correctness subset with each
# slice count forced, then alternating bench rounds at BATCH over head and the new build at slices auto/1/2/4.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/cmb; mkdir -p $L
BATCH=${BATCH:-8}; SEQ=${SEQ:-4096,16384}
if [ ! -d /tmp/variant_head ] || [ ! -d /tmp/variant_new ]; then
  rm -rf /tmp/head_src; mkdir -p /tmp/head_src; git archive HEAD | tar -x -C /tmp/head_src
  for v in head new; do
    src=.; [ $v = head ] && src=/tmp/head_src
    rm -rf /tmp/variant_$v
    python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_$v \
      -C build-dir=/tmp/variant_build_$v $src > $L/build_$v.log 2>&1 &
  done
  wait
  echo "builds t=$((SECONDS-t0)): $(ls /tmp/variant_head /tmp/variant_new | grep -c _jax_flashmla_cuda)"
fi
base=$PYTHONPATH
if [ "${CHECK:-1}" = 1 ]; then
  for s in 4 1; do
    PYTHONPATH=/tmp/variant_new:$base JAX_FLASHMLA_COMBINE_SLICES=$s timeout 200 python3 -m pytest -q -m gpu -x -n 4 \
      tests/test_gpu_kernels.py -k "dependent or hostile or all_empty or 6-4-140-16 or 8-2048" > $OUT/check_s$s.log 2>&1
    echo "check slices $s rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/check_s$s.log)"
  done
fi
ARGS="--batch $BATCH --seqlen $SEQ --s-q 1,2 --h-q 16,128 --causal off --no-baseline --repeats 3 --warmup 1"
read -r -a variants <<<"${VARIANTS:-head auto s1 s2 s4}"
for ((round = 1; round <= ${ROUNDS:-2}; round++)); do
  order=("${variants[@]}")
  if ((round % 2 == 0)); then order=(); for ((k = ${#variants[@]} - 1; k >= 0; k--)); do order+=("${variants[k]}"); done; fi
  for v in "${order[@]}"; do
    (( SECONDS - t0 < ${BUDGET:-540} )) || break 2
    d=bench_$v; ((round > 1)) && d=bench${round}_$v
    case $v in head) pp=/tmp/variant_head; env=;; auto) pp=/tmp/variant_new; env=;; *) pp=/tmp/variant_new; env=${v#s};; esac
    PYTHONPATH=$pp:$base JAX_FLASHMLA_COMBINE_SLICES=$env timeout 150 python3 -m jax_flashmla.bench $ARGS --out $L/$d > $L/$d.log 2>&1
    echo "round $round $v rc=$? t=$((SECONDS-t0))"
  done
done
python3 scripts/summarize_builds.py $L "${variants[@]}" | tee $OUT/means_b$BATCH.txt
cd $L && tar czf $OUT/logs_b$BATCH.tgz *.log && cd - >/dev/null
if [ "${SUITE:-0}" = 1 ]; then
  PYTHONPATH=/tmp/variant_new:$base timeout $((590 - SECONDS + t0)) python3 -m pytest -q -m gpu -n 4 tests/test_gpu_kernels.py > $OUT/gpu_tests_new.log 2>&1
  echo "gpu tests (new) rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/gpu_tests_new.log)"
fi
