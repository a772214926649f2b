#!/usr/bin/env bash
# Next session, call 0 (carry [".whl", ".exp"]): the narrow kernel (NOTES versions 2.12 and 2.13 "Next"): one case
# under a short timeout, the layout probe, its tests and the quick subset, memcheck and racecheck, then the h_q 16
# rows with it, with it and the combine kernel, and with the seesaw. An estimate of 7-9 minutes. Logs under
# $OUT/narrow.
cd "$(dirname "$0")/.."
timeout 570 bash scripts/gpu_check.sh "$OUT/narrow" narrow
