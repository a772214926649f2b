#!/usr/bin/env bash
# NOTES.md version 2.23, Next 1 (and 2.24, Next 1; carry [".whl", ".exp", ".fm"]; copy to .exp/s_fp.sh): both
# libraries' s_k 4096 compute row under Nsight Compute's full set with source, one warm launch each, clocks not
# locked, and each build's listing for scripts/stall_by_line.py. ncu's -k sees the bare function name: on the
# compute row (256 query rows per head group) the only decode_kernel launched is the seesaw's. (Until 2026-12-06
# 03:40 UTC the filter named the namespace and matched nothing.) Rerun if ncu crashes the Python process.
cd "$(dirname "$0")/.."
source scripts/device_build.sh --flashmla
wait_flashmla
mkdir -p /tmp/fp
for spec in "seesaw=^decode_kernel$" "flash=flash_fwd_splitkv"; do
  name=${spec%%=*} k=${spec#*=}
  timeout 200 ncu --clock-control none --set full --import-source yes -k regex:"$k" --launch-skip 1 --launch-count 1 \
    -o /tmp/fp/$name -f python3 scripts/flashmla_ab.py .fm --seqlen 4096 --pairs 2x128 --profile-launches 2 \
    > /tmp/fp/$name.log 2>&1
  echo "ncu $name rc=$? t=$((SECONDS-t0))"
  ncu --import /tmp/fp/$name.ncu-rep --print-details all > /tmp/fp/${name}_details.txt 2>&1
  ncu --import /tmp/fp/$name.ncu-rep --page source --print-source sass --csv > /tmp/fp/${name}_sass.csv 2>&1
  grep -E "^ +(Duration|SM Active Cycles|SM Frequency|L2 Hit Rate) " /tmp/fp/${name}_details.txt | head -4
done
ours=$(python3 -c "import _jax_flashmla_cuda as m; print(m.__file__)")
theirs=$(find /tmp/flashmla_ab_build -name "*.so" | head -1)
for side in ours theirs; do
  mkdir -p /tmp/fp/cubin_$side; (cd /tmp/fp/cubin_$side && cuobjdump -xelf all "${!side}" > /dev/null)
  for c in /tmp/fp/cubin_$side/*.cubin; do nvdisasm -gi -c "$c"; done > /tmp/fp/$side.lst 2>&1
done
tar -czf $OUT/fp.tgz -C /tmp/fp $(cd /tmp/fp && ls *.txt *.csv *.log *.lst 2>/dev/null)
