#!/usr/bin/env bash
# The A/B script of calls 1, 2, 3 and 5 (README.md here): builds each variant beside head, times them with the
# quick bench in alternating order, then the rows in between once each, then (calls 2, 3, 5) the GPU test subset
# and the sanitizers on the variant with the lowest summed time. Run from the repository root on the GPU machine,
# with the variant's patch applied to the working tree:
# e.g. FLAGS_head="" FLAGS_lsu="-DJFM_PF_LSU" FLAGS_lsush="-DJFM_PF_LSU -DJFM_PF_SHARE" VS="head lsu lsush" bash ab.sh
# SRC_<name>=DIR builds a variant from another source tree (call 1's ep0r); ORDER overrides the run order;
# NO_CHECK=1 skips the tests (call 1).
source scripts/gpu_env.sh
base=$PYTHONPATH
L=/tmp/l; mkdir -p $L
snap() { tar czf $OUT/logs.tgz -C /tmp l; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,temperature.gpu --format=csv | tee $L/gpu.txt
for v in $VS; do
  flags=FLAGS_$v; src=SRC_$v
  python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_$v -C build-dir=/tmp/vb_$v \
    -C "cmake.define.CMAKE_CUDA_FLAGS=${!flags}" ${!src:-.} >$L/build_$v.log 2>&1 &
done
wait; echo "built t=$SECONDS"
n=0
for v in ${ORDER:-$VS $(echo $VS | tr ' ' '\n' | tac | tr '\n' ' ')}; do
  n=$((n+1))
  PYTHONPATH=/tmp/variant_$v:$base timeout 60 python3 -m jax_flashmla.bench --quick --no-baseline --repeats 3 --warmup 1 \
    --out $L/q${n}_$v > $L/q${n}_$v.txt 2>&1
  echo "$v rc=$? t=$SECONDS $(grep -E '^128' $L/q${n}_$v.txt | awk '{print $8}' | tr '\n' ' ')"
done | tee $L/timing.txt
snap
for v in $VS; do
  PYTHONPATH=/tmp/variant_$v:$base timeout 60 python3 -m jax_flashmla.bench --seqlen 8192 --s-q 1,2 --h-q 16,64 --causal off \
    --no-baseline --repeats 3 --warmup 1 --out $L/m_$v > $L/m_$v.txt 2>&1
  echo "mid $v rc=$? t=$SECONDS $(grep -E '^128' $L/m_$v.txt | awk '{print $8}' | tr '\n' ' ')"
done | tee $L/timing_mid.txt
snap
[ -n "$NO_CHECK" ] && exit 0
BEST=$(grep -v '^head' $L/timing.txt | awk '{s[$1]+=$4+$5+$6+$7} END {for (v in s) print s[v], v}' | sort -n | head -1 | awk '{print $2}')
echo "BEST=$BEST"
PYTHONPATH=/tmp/variant_$BEST:$base timeout 150 python3 -m pytest -q -m gpu -x -n 4 tests/test_gpu_kernels.py \
  -k "not grid or (64-4-4096 or 6-2-140 or 2-1-20)" > $L/corr_$BEST.txt 2>&1; echo "tests $BEST rc=$? t=$SECONDS"; tail -n 1 $L/corr_$BEST.txt
snap
for tool in memcheck racecheck; do
  args=""; [ $tool = racecheck ] && args=small
  PYTHONPATH=/tmp/variant_$BEST:$base timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=jax_flashmla \
    python3 scripts/sanitize_cases.py $args > $L/$tool.txt 2>&1; echo "$tool rc=$? t=$SECONDS"; tail -n 1 $L/$tool.txt
done
snap
