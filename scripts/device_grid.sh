#!/usr/bin/env bash
# FlashMLA's perf grid on the lent GPU, for benchmarks/h100.json: the bench's default rows with the plain-XLA
# baseline, one bench call per s_k (4096, 8192, 16384, 32768). After each s_k the tables so far go to
# OUT_DIR/grid_tables.txt and all records so far, merged, to OUT_DIR/h100_grid.json, so that a call cut short
# still returns the rows it timed. Run from the repository root once the package is built (scripts/device_build.sh).
# Usage: scripts/device_grid.sh OUT_DIR [TIMEOUT [DEADLINE]]
#   TIMEOUT   seconds each bench call may take (default 150)
#   DEADLINE  seconds from now after which no further s_k starts (default: none); e.g. a driver's 330 s mark is
#             $((330 - SECONDS + t0))
# Prints each s_k's status with the seconds since this script started, and its table rows.
set -uo pipefail
OUT_DIR=${1:?usage: scripts/device_grid.sh OUT_DIR [TIMEOUT [DEADLINE]]}
TIMEOUT=${2:-150}
DEADLINE=${3:-}
WORK=$(mktemp -d /tmp/grid.XXXXXX)
ran=()  # the s_k run so far, in the grid's order, which the tables and the JSON keep
for S in 4096 8192 16384 32768; do
  [ -n "$DEADLINE" ] && ((SECONDS > DEADLINE)) && { echo "deadline: s_k $S not run"; break; }
  timeout "$TIMEOUT" python3 -m jax_flashmla.bench --seqlen $S --repeats 3 --warmup 1 --baseline-iters 2 \
    --out "$WORK/b$S" > "$WORK/grid_b$S.txt" 2>&1
  echo "s_k $S rc=$? t=$SECONDS"; grep -E "^ *[0-9]+ +[0-9]+ " "$WORK/grid_b$S.txt"
  ran+=("$S")
  for T in "${ran[@]}"; do cat "$WORK/grid_b$T.txt"; done > "$OUT_DIR/grid_tables.txt"
  python3 -c "
import json, os, sys
files = [f'{sys.argv[1]}/b{s}/results.json' for s in sys.argv[3:]]
records = [r for f in files if os.path.exists(f) for r in json.load(open(f))]
json.dump(records, open(sys.argv[2], 'w'), indent=1)
print(len(records), 'records')" "$WORK" "$OUT_DIR/h100_grid.json" "${ran[@]}"
done
