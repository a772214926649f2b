#!/usr/bin/env bash
# The whole GPU run in one command, for the lent Hopper GPU (H100, H200): build, GPU tests, compute-sanitizer,
# benchmark.
# Usage: scripts/gpu_check.sh LOG_DIR [quick|seesaw|narrow]
#   LOG_DIR  where logs go (created); the last lines of each step are printed as a summary.
#   quick    run a subset of the GPU grid (for iterating on a kernel).
#   seesaw   for work on the seesaw kernel (src/kernels/decode_seesaw.cuh, the default on Hopper): the quick
#            test subset, then (if they pass) memcheck, racecheck and the quick bench, each under a timeout
#            because a schedule bug may deadlock; then the single-softmax kernel's quick bench
#            (JAX_FLASHMLA_DECODE_KERNEL=hopper) for comparison. About 3 minutes when it works.
#   narrow   the same for the narrow kernel (src/kernels/decode_narrow.cuh, the default for head groups of at most
#            32 query rows; wider ones run the seesaw): one case under a short timeout, the layout probe
#            (scripts/layout_probe.py; on the seesaw too where it finds a fault), its tests and the quick subset,
#            then the memory-bound rows (h_q 16) timed with it (the combine kernel launched as its programmatic
#            dependent, the default, then after it: JAX_FLASHMLA_COMBINE=separate) and with the seesaw, and b 8
#            with both launches, then memcheck and racecheck.
# Environment: SKIP_BENCH=1 skips the benchmarks; BENCH_ARGS replaces the first one's flags (default --quick;
# BENCH_ARGS="" runs the full grid); the second times a stacked two-layer pool (--quick --layers 2).
# Offline machines: put wheels the image lacks (nvidia-cutlass) in .whl/ (scripts/gpu_env.sh installs them).
set -uo pipefail
LOG_DIR=${1:?usage: scripts/gpu_check.sh LOG_DIR [quick|seesaw|narrow]}
MODE=${2:-full}
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."
summary=()
step() {  # step NAME COMMAND...: runs, logs to LOG_DIR/NAME.log, records pass/fail and duration
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" >"$LOG_DIR/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$LOG_DIR/$name.log")")")
  return $rc
}

source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$LOG_DIR/gpu.txt" 2>&1
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" >>"$LOG_DIR/gpu.txt" 2>&1

step build python3 -m pip install -v --no-build-isolation --no-deps . || { printf '%s\n' "${summary[@]}"; exit 1; }
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable(); print('kernels ok')"

# compute-sanitizer over a few problems (scheduler, decode and combine kernels, hostile runtime values).
# Only our kernels are instrumented (--kernel-name filter): we vouch for ours.
# compute-sanitizer itself sometimes segfaults while the JAX process starts (rc 139, before any kernel ran;
# seen 2026-11-23 on the H100): retry that, up to 3 tries. A finding exits 9 and is never retried.
sanitize() {
  local try rc
  for try in 1 2 3; do
    compute-sanitizer --tool "$1" --error-exitcode 9 --kernel-name kns=jax_flashmla \
      python3 scripts/sanitize_cases.py "${@:2}"
    rc=$?
    [ $rc -ne 139 ] && return $rc
    echo "compute-sanitizer crashed (rc 139) on try $try"
  done
  return $rc
}
summarize() { echo; echo "== summary ($LOG_DIR)"; cat "$LOG_DIR/gpu.txt"; printf '%s\n' "${summary[@]}"; }
# For work on one kernel: the quick test subset (and FILTER's tests, if any), then, if they pass, memcheck (on
# sanitize_cases.py's MEMCHECK_CASES) and racecheck on the small cases, each under a timeout because a schedule bug
# may deadlock. Usage: kernel_checks PREFIX FILTER MEMCHECK_CASES (or its two halves, kernel_tests PREFIX FILTER
# and kernel_sanitizers PREFIX MEMCHECK_CASES)
kernel_tests() {
  step "$1_tests" timeout 300 python3 -m pytest -q -m gpu -x -n 4 tests/test_gpu_kernels.py \
    -k "${2:+$2 or }not grid or (64-4-4096 or 6-2-140 or 2-1-20)"
}
kernel_sanitizers() {
  step "$1_memcheck" timeout 150 bash -c "$(declare -f sanitize); sanitize memcheck $2"
  step "$1_racecheck" timeout 150 bash -c "$(declare -f sanitize); sanitize racecheck small"
}
kernel_checks() {
  kernel_tests "$1" "$2" || return 1
  kernel_sanitizers "$1" "$3"
  return 0  # the tests passed; the sanitizers' findings are in the summary
}

if [ "$MODE" = seesaw ]; then
  export JAX_FLASHMLA_DECODE_KERNEL=seesaw
  # The bench runs even when a sanitizer complains (the results matched): the numbers decide whether to go on.
  kernel_checks seesaw "" "" &&
    step seesaw_bench timeout 120 python3 -m jax_flashmla.bench --quick --no-baseline --out "$LOG_DIR/seesaw_bench"
  # The single-softmax kernel on the same machine, minutes apart: the comparison the seesaw has to win.
  JAX_FLASHMLA_DECODE_KERNEL=hopper step hopper_bench timeout 120 python3 -m jax_flashmla.bench --quick --no-baseline \
    --out "$LOG_DIR/hopper_bench"
  summarize
  exit 0
fi

if [ "$MODE" = narrow ]; then
  unset JAX_FLASHMLA_DECODE_KERNEL JAX_FLASHMLA_COMBINE  # the defaults: the narrow kernel, the dependent combine
  # One case first, under a short timeout: a schedule bug that hangs then costs two minutes, not the tests' five.
  step narrow_smoke timeout 150 python3 -m pytest -q -m gpu -x tests/test_gpu_kernels.py -k "narrow-16-1-1-bfloat16"
  smoke=$?
  # Unless it hung: the layout probe, which says where a wrong result comes from, for both widths of the narrow
  # kernel (16 and 32 query rows) and, with s_q 2, its causal mask, the second with two KV heads; where it finds
  # one, the same problems on the seesaw too (its control).
  if [ $smoke -ne 124 ]; then
    for shape in "16 1 1" "16 1 2" "16 2 2"; do
      read -r h_q h_kv s_q <<<"$shape"
      name=probe_h${h_q}_kv${h_kv}_s${s_q}
      step narrow_$name timeout 90 python3 scripts/layout_probe.py --h-q $h_q --h-kv $h_kv --s-q $s_q ||
        JAX_FLASHMLA_DECODE_KERNEL=seesaw step seesaw_$name timeout 90 python3 scripts/layout_probe.py --h-q $h_q \
          --h-kv $h_kv --s-q $s_q
    done
  fi
  # The benches before the sanitizers: if the call runs out of time, what is lost can run in the next one.
  if [ $smoke -eq 0 ] && kernel_tests narrow "narrow or 2-1-140-16"; then
    memory_rows() { step "$1" timeout 150 python3 -m jax_flashmla.bench --h-q 16 --s-q 1,2 --seqlen 4096,16384 \
      --no-baseline --out "$LOG_DIR/$1"; }
    memory_rows narrow_bench  # the combine as the decode's dependent (the default)
    JAX_FLASHMLA_COMBINE=separate memory_rows narrow_separate_bench  # the combine launched after the decode
    JAX_FLASHMLA_DECODE_KERNEL=seesaw memory_rows seesaw_bench
    # Few sequences, so many splits each: where the combine costs most (about 16 splits a sequence here).
    for combine in dependent separate; do
      JAX_FLASHMLA_COMBINE=$combine step narrow_b8_${combine}_bench timeout 90 python3 -m jax_flashmla.bench \
        --batch 8 --h-q 16 --s-q 1 --seqlen 16384 --causal off --no-baseline --out "$LOG_DIR/narrow_b8_${combine}_bench"
    done
    kernel_sanitizers narrow small
  fi
  summarize
  exit 0
fi

if [ "$MODE" = quick ]; then
  step gpu_tests python3 -m pytest -q -m gpu -x -n 4 --durations=10 tests/test_gpu_kernels.py -k "not grid or (64-4-4096 or 6-2-140 or 2-1-20)"
else
  step gpu_tests python3 -m pytest -q -m gpu -n 8 --durations=10 --continue-on-collection-errors tests/
fi

step memcheck sanitize memcheck
step racecheck sanitize racecheck small
# The steps above launch the combine as the decode's programmatic dependent (the default). The seesaw releases it
# too (the small cases run the narrow kernel), and the plain launch stays selectable: one run of each, under
# kernel_sanitizers' timeouts. compute-sanitizer crashed once (rc 139) in 3 racechecks of the seesaw with the
# dependent launch, mid-run, and not in the two retries (benchmarks/NOTES.md 2.21): sanitize() retries that.
JAX_FLASHMLA_DECODE_KERNEL=seesaw kernel_sanitizers dependent_seesaw small
JAX_FLASHMLA_COMBINE=separate kernel_sanitizers separate_narrow small

# The main job end to end on the GPU: cached decode through the kernels against a full recompute.
step demo python3 -m jax_flashmla.demo --no-progress

if [ -z "${SKIP_BENCH:-}" ] && python3 -c "import jax_flashmla.bench" 2>/dev/null; then
  step bench python3 -m jax_flashmla.bench --out "$LOG_DIR/bench" ${BENCH_ARGS---quick}
  # A two-layer stacked pool read in place, and the same call given the layer sliced out (e2e_sliced_ms).
  step bench_layers python3 -m jax_flashmla.bench --quick --layers 2 --no-baseline --out "$LOG_DIR/bench_layers"
fi

summarize
