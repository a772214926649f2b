#!/usr/bin/env bash
# Why L2 prefetches slow the kernel: DRAM bytes and L2 hit rates of head / half / ahead (pf_sector.patch macros).
cd "$(dirname "$0")/../../.."  # the repository root
source scripts/gpu_env.sh
base=$PYTHONPATH
L=/tmp/l; mkdir -p $L
snap() { tar czf $OUT/logs.tgz -C /tmp l; }
declare -A FL=([head]="" [half]="-DJFM_PF_HALF" [ahead]="-DJFM_PF_AHEAD")
VS="head half ahead"
for v in $VS; do
  python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_$v -C build-dir=/tmp/vb_$v \
    -C "cmake.define.CMAKE_CUDA_FLAGS=${FL[$v]}" . >$L/build_$v.log 2>&1 &
done
wait; echo "built t=$SECONDS"
M=gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sectors_op_read.sum,lts__t_sector_op_read_hit_rate.pct,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,lts__t_requests_srcunit_tex_op_read.sum,sm__cycles_elapsed.avg.per_second
for row in "4096 1 16" "16384 2 128"; do
  set -- $row
  for v in $VS; do
    S_K=$1 S_Q=$2 H_Q=$3 PYTHONPATH=/tmp/variant_$v:$base timeout 90 ncu --clock-control none -k regex:decode_kernel \
      --launch-skip 2 --launch-count 1 --metrics $M python3 benchmarks/h200_v2_9_ab_logs/call4/ncu_one.py > $L/n_${v}_$1.txt 2>&1
    echo "$v $row rc=$? t=$SECONDS"
    grep -E "gpu__time|dram__bytes|lts__|sm__cycles" $L/n_${v}_$1.txt
    snap
  done
done
