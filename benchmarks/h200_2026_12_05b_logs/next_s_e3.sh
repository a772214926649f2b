#!/usr/bin/env bash
# Next session, call 3 (carry [".whl", ".exp", ".fm"]): both kernels' s_q 1, h_q 16 rows under Nsight Compute
# (NOTES.md version 2.15, Next 3): time, DRAM bytes and throughput, L2 sectors, and the spread of SM active cycles
# (the tail). flashmla_ab.py's --profile-launches mode has not run before. About 5 minutes with FlashMLA's build.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" 2>/dev/null \
  || { python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"; }
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_active.min,sm__cycles_elapsed.avg,launch__grid_size,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct
timeout 400 ncu --clock-control none -k regex:"decode_kernel|combine|flash_fwd" --metrics $M --csv \
  python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16 --profile-launches 2 > $OUT/ncu_ab.csv 2> $OUT/ncu_ab.err
echo "ncu rc=$? t=$((SECONDS-t0))"; tail -n 5 $OUT/ncu_ab.err
python3 - "$OUT/ncu_ab.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, body = rows[0], rows[1:]
k, m, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
for r in body:
    print(r[0], r[k][:48], r[m], r[v])
PY
