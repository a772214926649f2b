#!/usr/bin/env bash
# NOTES.md version 2.26, Next 0 and 1 (carry [".whl", ".exp"]; copy to .exp/s_comb.sh). Builds head's combine
# (HEAD_REF, default 51a80aa: one warp a row), the tree, and the tree with -DJFM_COMBINE_PART_ROW_BLOCKS=2 (rb2);
# the slices test (two, four and eight warps; eight has not run on a GPU before) and memcheck with eight warps
# forced; then alternating rounds (ROUNDS, default 4) of:
#   b 128, s_k 4096 and 16384, s_q 2, h_q 128 (Next 0): old, new, rb2;
#   b 8, s_k 4096 and 16384, s_q 1 and 2, h_q 16 (Next 1): new, new with JAX_FLASHMLA_COMBINE_SLICES=8 (s8).
# Two calls if one runs out: the builds stay while the machine is warm (rerun with the same script).
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
L=/tmp/comb; mkdir -p $L
base=$PYTHONPATH
if [ ! -d /tmp/variant_old ] || [ ! -d /tmp/variant_new ] || [ ! -d /tmp/variant_rb2 ]; then
  rm -rf /tmp/old_src; mkdir -p /tmp/old_src; git archive ${HEAD_REF:-51a80aa} | tar -x -C /tmp/old_src
  for v in old new rb2; do
    src=.; flags=; [ $v = old ] && src=/tmp/old_src; [ $v = rb2 ] && flags=-DJFM_COMBINE_PART_ROW_BLOCKS=2
    rm -rf /tmp/variant_$v
    python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_$v \
      -C build-dir=/tmp/variant_build_$v -C "cmake.define.CMAKE_CUDA_FLAGS=$flags" $src > $L/build_$v.log 2>&1 &
  done
  wait
  echo "builds t=$((SECONDS-t0)): $(ls /tmp/variant_old /tmp/variant_new /tmp/variant_rb2 | grep -c _jax_flashmla_cuda)"
  PYTHONPATH=/tmp/variant_new:$base timeout 150 python3 -m pytest -q -m gpu -n 4 tests/test_gpu_kernels.py \
    -k "slices or dependent" > $OUT/slices_test.log 2>&1
  echo "slices tests rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/slices_test.log)"
  PYTHONPATH=/tmp/variant_new:$base JAX_FLASHMLA_COMBINE_SLICES=8 timeout 100 compute-sanitizer --tool memcheck \
    --error-exitcode 9 --kernel-name kns=jax_flashmla python3 scripts/sanitize_cases.py small > $OUT/memcheck_s8.log 2>&1
  echo "memcheck s8 rc=$? t=$((SECONDS-t0)): $(tail -n 1 $OUT/memcheck_s8.log)"
fi
ARGS128="--batch 128 --seqlen 4096,16384 --s-q 2 --h-q 128 --causal off --no-baseline --repeats 3 --warmup 1"
ARGS8="--batch 8 --seqlen 4096,16384 --s-q 1,2 --h-q 16 --causal off --no-baseline --repeats 3 --warmup 1"
run() {  # NAME ROUND VARIANT SLICES ARGS
  local d=$L/bench_$1; (($2 > 1)) && d=$L/bench$2_$1
  PYTHONPATH=/tmp/variant_$3:$base JAX_FLASHMLA_COMBINE_SLICES=$4 timeout 150 python3 -m jax_flashmla.bench $5 \
    --out $d > $d.log 2>&1
  echo "round $2 $1 rc=$? t=$((SECONDS-t0))"
}
for ((round = 1; round <= ${ROUNDS:-4}; round++)); do
  (( SECONDS - t0 < ${BUDGET:-480} )) || break
  if ((round % 2)); then
    run old $round old "" "$ARGS128"; run new $round new "" "$ARGS128"; run rb2 $round rb2 "" "$ARGS128"
    run n8 $round new "" "$ARGS8"; run s8 $round new 8 "$ARGS8"
  else
    run s8 $round new 8 "$ARGS8"; run n8 $round new "" "$ARGS8"
    run rb2 $round rb2 "" "$ARGS128"; run new $round new "" "$ARGS128"; run old $round old "" "$ARGS128"
  fi
done
python3 scripts/summarize_builds.py $L old new rb2 | tee $OUT/means_b128.txt
python3 scripts/summarize_builds.py $L n8 s8 | tee $OUT/means_b8.txt
cd $L && tar czf $OUT/logs.tgz *.log && cd - >/dev/null
