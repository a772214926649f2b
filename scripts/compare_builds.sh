#!/usr/bin/env bash
# Times several builds of the extension on one GPU, minutes apart: the way to test a kernel change behind a
# preprocessor macro before it becomes the code (run-to-run spread between machines is about 6%).
# Usage: scripts/compare_builds.sh LOG_DIR NAME[@SOURCE_DIR]=CUDA_FLAGS ...
#   e.g. scripts/compare_builds.sh /tmp/cmp head@/tmp/head_src= new= order=-DSEESAW_ORDER
#   SOURCE_DIR: another checkout to build (default: this one), such as `git archive HEAD` unpacked.
# All builds run in parallel (own build folder, installed to /tmp/variant_NAME). Then, for each build in turn:
# a correctness subset of the GPU tests, then the quick bench (BENCH_ARGS overrides its flags). The subset: b 64,
# s_q 2, s_k 4096, h_q 128 and b 6, s_q 4, s_k 140, h_q 16, both causal settings and dtypes; hostile ids; empty
# batches. CHECK_TESTS overrides its -k expression; CHECK_TESTS=none, or a NAME that starts with "probe", skips
# it: for probes that compute wrong results on purpose.
# Then the chunk-boundary row: b 512, s_k 1024 (fixed lengths), s_q 2, h_q 128, about 16 chunks per CTA, the row
# that shows what a chunk boundary costs (benchmarks/NOTES.md, version 2.3); BOUNDARY_ROW=0 skips it.
# ROUNDS=N (default 1) runs the bench N - 1 more times over the builds whose first one ran, each round in the
# reverse order of the one before (A B C, then C B A, A B C, ...), so that the GPU's drift in clock and
# temperature falls on every build alike: compare builds within a call, over all their rounds.
# The builds run the default kernels: a seesaw change shows on rows of more than 32 query rows per head group only,
# unless JAX_FLASHMLA_DECODE_KERNEL=seesaw is set (head groups of at most 32 rows run the narrow kernel).
# LOG_DIR gets one log per step and summary.txt: each step's last line, and the benchmarks' table rows, then
# (scripts/summarize_builds.py) each build's mean kernel ms per row over its rounds against the first build's.
set -uo pipefail
LOG_DIR=${1:?usage: scripts/compare_builds.sh LOG_DIR NAME=CUDA_FLAGS ...}
shift
[ $# -gt 0 ] || { echo "no builds named" >&2; exit 2; }
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
CHECK_TESTS=${CHECK_TESTS:-"64-2-4096-128-1 or 6-4-140-16 or hostile or all_empty"}
read -r -a BENCH <<<"${BENCH_ARGS:---quick --no-baseline}"
BOUNDARY=(--batch 512 --seqlen 1024 --s-q 2 --h-q 128 --causal off --fixed-lengths --no-baseline --iters 50
          --repeats 3 --warmup 1)
base_path=${PYTHONPATH:-}
summary="$LOG_DIR/summary.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader >"$summary" 2>&1

# One step of one build: the command's output to LOG_DIR/STEP_NAME.log, its last line (and a benchmark's table
# rows) to the summary; returns the command's status.
run_step() {
  local name=$1 step=$2
  shift 2
  local log="$LOG_DIR/${step}_$name.log"
  "$@" >"$log" 2>&1
  local rc=$?
  printf '%-8s %-8s rc=%-3s %s\n' "$name" "$step" "$rc" "$(tail -n 1 "$log")" | tee -a "$summary"
  # The benchmarks' table rows too, so the summary alone compares the builds.
  [ "$step" = check ] || grep -E '^ *[0-9]' "$log" | sed 's/^/    /' | tee -a "$summary"
  return $rc
}

names=()
for spec in "$@"; do
  name=${spec%%=*} flags=${spec#*=} source=.
  if [[ $name == *@* ]]; then source=${name#*@} name=${name%%@*}; fi
  names+=("$name")
  echo "== build $name from $source: CMAKE_CUDA_FLAGS='$flags'"
  rm -rf "/tmp/variant_$name"
  python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target "/tmp/variant_$name" \
    -C "build-dir=/tmp/variant_build_$name" -C "cmake.define.CMAKE_CUDA_FLAGS=$flags" "$source" \
    >"$LOG_DIR/build_$name.log" 2>&1 &
done
wait

timed=()  # builds whose first bench ran, for ROUNDS
for name in "${names[@]}"; do
  # Without the extension the package would time its pure-JAX fallback: a failed build must not be timed.
  if ! compgen -G "/tmp/variant_$name/_jax_flashmla_cuda*" >/dev/null; then
    printf '%-8s build  failed: %s\n' "$name" "$(tail -n 1 "$LOG_DIR/build_$name.log")" | tee -a "$summary"
    continue
  fi
  export PYTHONPATH=/tmp/variant_$name${base_path:+:$base_path}
  # The checkout's package imports the variant's extension: one it refuses (built from other FFI handlers, say)
  # would leave the pure-JAX path to be timed.
  if ! why=$(python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" 2>&1); then
    printf '%-8s build  unusable: %s\n' "$name" "$(echo "$why" | tail -n 1)" | tee -a "$summary"
    continue
  fi
  steps=(check bench)
  [ "$CHECK_TESTS" = none ] || [[ $name == probe* ]] && steps=(bench)
  [ "${BOUNDARY_ROW:-1}" = 0 ] || steps+=(boundary)
  for step in "${steps[@]}"; do
    case $step in
      check) run_step "$name" check timeout 240 python3 -m pytest -q -m gpu -x -n 4 tests/test_gpu_kernels.py \
               -k "$CHECK_TESTS" ;;
      bench) run_step "$name" bench timeout 240 python3 -m jax_flashmla.bench "${BENCH[@]}" \
               --out "$LOG_DIR/bench_$name" && timed+=("$name") ;;
      boundary) run_step "$name" boundary timeout 120 python3 -m jax_flashmla.bench "${BOUNDARY[@]}" \
                  --out "$LOG_DIR/boundary_$name" ;;
    esac || break
  done
done

for ((round = 2; round <= ${ROUNDS:-1}; round++)); do
  order=("${timed[@]}")
  if ((round % 2 == 0)); then
    order=()
    for ((k = ${#timed[@]} - 1; k >= 0; k--)); do order+=("${timed[k]}"); done
  fi
  for name in "${order[@]}"; do
    export PYTHONPATH=/tmp/variant_$name${base_path:+:$base_path}
    run_step "$name" "bench$round" timeout 240 python3 -m jax_flashmla.bench "${BENCH[@]}" \
      --out "$LOG_DIR/bench${round}_$name"
  done
done

# Every timed build's mean kernel time per row over its rounds, against the first build's.
if ((${#timed[@]})); then python3 scripts/summarize_builds.py "$LOG_DIR" "${timed[@]}" | tee -a "$summary"; fi
