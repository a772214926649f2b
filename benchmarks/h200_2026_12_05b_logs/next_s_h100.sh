#!/usr/bin/env bash
# First call of a session lent an H100 (carry [".whl", ".exp"]): FlashMLA's grid with the current defaults, the
# issue's own measurement (benchmarks/h100.json is from 2026-11-23, the seesaw at every width, before the refill
# change and the narrow kernel). Four s_k, each one bench call with the plain-XLA baseline, merged into one JSON.
# About 8 minutes on the H200 (2026-12-05). Only 8 files of $OUT come back: the JSON, the tables, the build log.
cd "$(dirname "$0")/.."
source scripts/device_build.sh
scripts/device_grid.sh $OUT 150

