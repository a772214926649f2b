#!/usr/bin/env bash
# On an H100, after s_g4.sh on the same tree: Nsight Compute (full set) of the s_k 4096 memory row (narrow kernel) and
# compute row (seesaw), the two rows furthest from the targets; the chunk timeline ran earlier (s_t4.sh, call 2).
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 -c "import jax_flashmla as j; assert j.kernels_available()" 2>/dev/null \
  || { python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"; }
timeout 300 bash scripts/profile_decode.sh /tmp/prof > $OUT/profile_summary.txt 2>&1
echo "profile rc=$? t=$((SECONDS-t0))"; cat $OUT/profile_summary.txt | cut -c1-160 | head -70
tar -czf $OUT/profile.tgz -C /tmp/prof $(cd /tmp/prof && ls *.txt *.csv *.log 2>/dev/null)
