#!/usr/bin/env bash
# After s_p1.sh on the same warm H100: the memory row's full profile again (its first run crashed the Python process
# under ncu), then s_e3.sh's side-by-side metrics of both kernels with the compute row added.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
PROFILE_ROWS=memory_bound timeout 120 bash scripts/profile_decode.sh /tmp/prof > $OUT/profile_summary_memory.txt 2>&1
echo "profile rc=$? t=$((SECONDS-t0))"; head -60 $OUT/profile_summary_memory.txt | cut -c1-160
tar -czf $OUT/profile_memory.tgz -C /tmp/prof ncu_memory_bound.txt ncu_memory_bound.sass.csv ncu_memory_bound.log
sed -i 's/--pairs 1x16 --profile-launches 2/--pairs 1x16,2x128 --profile-launches 2/; s/timeout 400 ncu/timeout 240 ncu/' .exp/s_e3.sh
bash .exp/s_e3.sh
