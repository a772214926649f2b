#!/usr/bin/env bash
# On an H100: FlashMLA's grid on the current defaults (the narrow kernel's splits charged 2; NOTES 2.22 Next 1) for
# benchmarks/h100.json, the JSON written after each s_k, while FlashMLA builds in the background; then FlashMLA beside
# the current kernels (version 2.21's Next 1). The GPU tests ran in the call before on the same tree (s_t2.sh).
cd "$(dirname "$0")/.."
source scripts/device_build.sh --flashmla
scripts/device_grid.sh $OUT 120 $((330 - SECONDS + t0))
wait_flashmla
left=$((570 - SECONDS + t0)); ((left > 60)) || exit 0
timeout $left python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16,2x16,2x128 --rounds 2 \
  --out /tmp/ab > /tmp/ab.log 2>&1
echo "A/B rc=$? t=$((SECONDS-t0))"; grep "^s_k" /tmp/ab.log; cp /tmp/ab.log /tmp/ab/flashmla_ab.json $OUT/ 2>/dev/null
