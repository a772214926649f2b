#!/usr/bin/env bash
# Next session, call 1 (carry [".whl", ".exp"]): the combine as the decode's programmatic dependent
# (JAX_FLASHMLA_COMBINE=dependent, NOTES.md version 2.15) against the plain launch, one build: its tests, then
# 3 rounds in alternating order at b 128 (h_q 16 and 128, s_q 1 and 2, s_k 4096 and 16384) and b 8 (h_q 16, s_q 1);
# scripts/summarize_builds.py compares the settings as it compares builds; then the test on a probe build whose
# combine does not wait, which must fail. About 9 minutes.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
# The probe build (the combine without its wait), beside the real one: test_dependent_combine_launch must fail on it.
python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_nowait \
  -C build-dir=/tmp/variant_build_nowait -C "cmake.define.CMAKE_CUDA_FLAGS=-DJFM_PROBE_COMBINE_NO_WAIT" . \
  > $OUT/build_nowait.log 2>&1 &
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
# Without the kernels the bench would time the pure-JAX path: stop here instead.
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" \
  || { tail -n 30 $OUT/build.log; exit 1; }
timeout 150 python3 -m pytest -q -m gpu -n 8 tests/test_gpu_kernels.py -k "dependent or hostile_metadata or int32 or metadata_kernel or attention_sink" \
  > $OUT/tests.log 2>&1; trc=$?; echo "tests rc=$trc t=$((SECONDS-t0)) $(tail -n 1 $OUT/tests.log)"
grep -E "^(FAILED|ERROR)" $OUT/tests.log | cut -c1-200 | head
# Changed since the last full GPU run (c57b082): the bench's timing fallback, reserve's shard check, the tests'
# matmul precision.
timeout 90 python3 -m pytest -q -m gpu -n 4 tests/test_paging.py tests/test_device_timing.py tests/test_bench.py \
  > $OUT/changed_tests.log 2>&1; echo "changed-file GPU tests rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/changed_tests.log)"
wait  # the probe build: off the CPUs before anything is timed
echo "probe build: $(tail -n 1 $OUT/build_nowait.log) $(ls /tmp/variant_nowait | grep -c _jax_flashmla) extension file(s)"
# A test timeout may be a dependent launch that hangs: then time the plain launch only.
declare -A SETTING=([plain]=separate [dep]=dependent)
names="plain dep"; ((trc == 124)) && { names="plain"; echo "tests timed out: the dependent launch is not timed"; }
B=/tmp/s_e1_bench; mkdir -p $B  # the bench folders stay here: only 8 files of $OUT come back
for round in 1 2 3; do
  order=$names; ((round % 2 == 0)) && order=$(echo $names | tr ' ' '\n' | tac | tr '\n' ' ')
  for name in $order; do
    dir=bench; ((round > 1)) && dir=bench$round
    for b in 128 8; do
      if [ $b = 128 ]; then rows=(--h-q 16,128 --s-q 1,2 --seqlen 4096,16384); else rows=(--h-q 16 --s-q 1 --seqlen 4096,16384); fi
      JAX_FLASHMLA_COMBINE=${SETTING[$name]} timeout 120 python3 -m jax_flashmla.bench --batch $b "${rows[@]}" \
        --causal off --no-baseline --repeats 3 --warmup 1 --out $B/pdl/b$b/${dir}_$name > $B/pdl_b${b}_${dir}_$name.log 2>&1
      echo "round $round $name b $b rc=$? t=$((SECONDS-t0))"
    done
  done
done
for b in 128 8; do python3 scripts/summarize_builds.py $B/pdl/b$b $names; done | tee $OUT/pdl_summary.txt
# The combine's share: kernel_tail_ms (the end of the split-KV kernel to the decode's end), mean over the rounds.
python3 - $B/pdl <<'PY' | tee -a $OUT/pdl_summary.txt
import collections, json, pathlib, statistics, sys
tails = collections.defaultdict(list)
for f in sorted(pathlib.Path(sys.argv[1]).glob("b*/bench*_*/results.json")):
    for r in json.loads(f.read_text()):
        if r.get("kernel_tail_ms") is not None:
            tails[(r["batch"], r["s_k"], r["s_q"], r["h_q"], f.parent.name.split("_")[-1])].append(r["kernel_tail_ms"])
for key in sorted(tails):
    print("tail us b %d s_k %d s_q %d h_q %d %-5s %.1f" % (*key, 1e3 * statistics.mean(tails[key])))
PY
tar czf $OUT/bench_logs.tgz -C $B .
# The probe must fail by its results (a mismatch), not by missing kernels: its FAILED lines say which.
PYTHONPATH=/tmp/variant_nowait${PYTHONPATH:+:$PYTHONPATH} timeout $((585 - SECONDS + t0 > 30 ? 585 - SECONDS + t0 : 30)) \
  python3 -m pytest -q -m gpu -n 8 tests/test_gpu_kernels.py -k "dependent_combine" > $OUT/probe_nowait.log 2>&1
echo "probe without the wait (should fail) rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/probe_nowait.log)"
grep -E "^(FAILED|ERROR)|^E .*(Mismatch|not equal|kernels)" $OUT/probe_nowait.log | cut -c1-160 | head -n 6
