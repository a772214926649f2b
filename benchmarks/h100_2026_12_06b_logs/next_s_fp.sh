#!/usr/bin/env bash
# Next session (carry [".whl", ".exp", ".fm"]; copy to .exp/s_fp.sh; NOTES.md version 2.23, Next 1): both libraries'
# compute row (s_k 4096, s_q 2, h_q 128, causal off) under Nsight Compute's full set with source, one launch each,
# clocks not locked, for the stall reasons side by side and by source line (scripts/stall_by_line.py needs a
# listing: nvdisasm is on the GPU machine, not on the CI machine). About 6 minutes with FlashMLA's build.
cd "$(dirname "$0")/.."
source scripts/device_build.sh --flashmla
wait_flashmla
mkdir -p /tmp/fp
# The script decodes each side once to compare, then 2 more times each: the 2nd launch of each kernel is a warm one.
for k in "seesaw::decode_kernel" "flash_fwd_splitkv"; do
  name=${k%%::*}; name=${name%%_*}
  timeout 200 ncu --clock-control none --set full --import-source yes -k regex:"$k" --launch-skip 1 --launch-count 1 \
    -o /tmp/fp/$name -f python3 scripts/flashmla_ab.py .fm --seqlen 4096 --pairs 2x128 --profile-launches 2 \
    > /tmp/fp/$name.log 2>&1
  echo "ncu $name rc=$? t=$((SECONDS-t0))"
  ncu --import /tmp/fp/$name.ncu-rep --print-details all > /tmp/fp/${name}_details.txt 2>&1
  ncu --import /tmp/fp/$name.ncu-rep --page source --print-source sass --csv > /tmp/fp/${name}_sass.csv 2>&1
  grep -E "Duration|hmma|Warp Cycles Per Issued|Stall (Wait|Long|GMMA|Barrier|No Inst|Dispatch|MIO)|Registers Per" \
    /tmp/fp/${name}_details.txt | grep -v "Achieved" | head -14
done
# Listings for scripts/stall_by_line.py: each build's cubins (both are compiled with -lineinfo), disassembled here.
ours=$(python3 -c "import _jax_flashmla_cuda as m; print(m.__file__)")
theirs=$(find /tmp/flashmla_ab_build -name "*.so" | head -1)
for side in ours theirs; do
  mkdir -p /tmp/fp/cubin_$side; (cd /tmp/fp/cubin_$side && cuobjdump -xelf all "${!side}" > /dev/null)
  for c in /tmp/fp/cubin_$side/*.cubin; do nvdisasm -gi -c "$c"; done > /tmp/fp/$side.lst 2>&1
done
ls -la /tmp/fp/*.lst
tar -czf $OUT/fp.tgz -C /tmp/fp $(cd /tmp/fp && ls *.txt *.csv *.log *.lst 2>/dev/null)
