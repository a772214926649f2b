#!/usr/bin/env bash
# On an H100 (NOTES 2.26 Next 4): FlashMLA's grid on the current tree for benchmarks/h100.json, written after each
# s_k, while FlashMLA builds in the background; then FlashMLA beside the current kernels on the target rows.
cd "$(dirname "$0")/.."
source scripts/device_build.sh --flashmla
scripts/device_grid.sh $OUT 110 $((300 - SECONDS + t0))
wait_flashmla
left=$((545 - SECONDS + t0)); ((left > 60)) || exit 0
timeout $left python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16,2x128 --rounds 2 \
  --out /tmp/ab > /tmp/ab.log 2>&1
echo "A/B rc=$? t=$((SECONDS-t0))"; grep "^s_k" /tmp/ab.log; cp /tmp/ab.log /tmp/ab/flashmla_ab.json $OUT/ 2>/dev/null
