#!/usr/bin/env bash
# Next session (carry [".whl", ".exp", ".fm"]; NOTES.md version 2.21, Next 1): FlashMLA as its setup.py builds it
# (ptxas --register-usage-level=10) beside the current defaults (the two-page ring, the dependent combine), on the
# memory rows (s_q 1 and 2, h_q 16) and the compute rows. About 6 minutes. Then, in a call of its own (the machine
# keeps both builds while it stays warm), s_e3.sh: both kernels' s_q 1, h_q 16 rows under Nsight Compute.
# .fm holds FlashMLA's csrc at 9241ae3: `fetch github:deepseek-ai/FlashMLA`, then here
#   mkdir -p .fm && git --git-dir=/work/.mirror/deepseek-ai+FlashMLA/repo archive 9241ae3 csrc | tar -x -C .fm
# and `echo /.fm/ >> .git/info/exclude` (likewise /.whl/ and /.exp/).
cd "$(dirname "$0")/.."
source scripts/device_build.sh --flashmla
wait_flashmla
timeout 300 python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16,2x16,2x128 --rounds 2 \
  --out /tmp/ab > /tmp/ab.log 2>&1
echo "A/B rc=$? t=$((SECONDS-t0))"; grep "^s_k" /tmp/ab.log; cp /tmp/ab.log /tmp/ab/flashmla_ab.json $OUT/ 2>/dev/null
