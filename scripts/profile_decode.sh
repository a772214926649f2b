#!/usr/bin/env bash
# Nsight Compute profile of the split-KV decode kernel on one memory-bound and one compute-bound bench row (by
# default the narrow kernel on the first, 16 query rows, and the seesaw on the second).
# Usage: scripts/profile_decode.sh LOG_DIR   (after the package is built, e.g. by scripts/gpu_check.sh)
#        JAX_FLASHMLA_DECODE_KERNEL=seesaw scripts/profile_decode.sh LOG_DIR   the seesaw on both rows
#        JAX_FLASHMLA_DECODE_KERNEL=hopper scripts/profile_decode.sh LOG_DIR   the single-softmax kernel
#        PROFILE_ROWS=compute_bound scripts/profile_decode.sh LOG_DIR          one row only
#        NCU_CLOCK_CONTROL=none scripts/profile_decode.sh LOG_DIR              clocks not locked (ncu's default
#          locks them at base), to compare with a profile taken that way (FlashMLA's, NOTES.md version 2.24)
# Writes LOG_DIR/ncu_<row>.txt (all sections: throughput, pipes, shared memory, warp stalls), ncu_<row>.sass.csv
# (stall samples per SASS instruction; scripts/stall_hotspots.py ranks them, scripts/stall_by_line.py sums them
# per kernel source line) and .ncu-rep files.
set -uo pipefail
LOG_DIR=${1:?usage: scripts/profile_decode.sh LOG_DIR}
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
profile() {  # profile NAME BENCH_FLAGS...
  local name=$1; shift
  # Skip the warm-up launches; profile one decode launch of the timed loop.
  ncu --kernel-name decode_kernel --launch-skip 3 --launch-count 1 ${NCU_CLOCK_CONTROL:+--clock-control "$NCU_CLOCK_CONTROL"} \
      --set full --import-source yes \
      --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second \
      -o "$LOG_DIR/ncu_$name" -f \
      python3 -m jax_flashmla.bench --no-baseline --warmup 1 --iters 3 --repeats 1 --causal off --out "$LOG_DIR/bench_$name" "$@" \
      >"$LOG_DIR/ncu_$name.log" 2>&1
  ncu --import "$LOG_DIR/ncu_$name.ncu-rep" --print-details all >"$LOG_DIR/ncu_$name.txt" 2>&1
  ncu --import "$LOG_DIR/ncu_$name.ncu-rep" --page source --print-source sass --csv >"$LOG_DIR/ncu_$name.sass.csv" 2>&1
  echo "== $name"; grep -E "Shared|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|hmma|Registers Per|Stall|Issue Slots Busy|L2 Hit" "$LOG_DIR/ncu_$name.txt" \
    | grep -vE "Roofline|Achieved Value" | head -30
  python3 scripts/stall_hotspots.py "$LOG_DIR/ncu_$name.sass.csv" --top 15
}
# PROFILE_ROWS picks rows (default both), e.g. PROFILE_ROWS=compute_bound.
for row in ${PROFILE_ROWS:-memory_bound compute_bound}; do
  case $row in
    memory_bound) profile memory_bound --seqlen 4096 --s-q 1 --h-q 16 ;;
    compute_bound) profile compute_bound --seqlen 4096 --s-q 2 --h-q 128 ;;
    *) echo "unknown row $row (memory_bound, compute_bound)"; exit 2 ;;
  esac
done
