#!/usr/bin/env bash
# First call: on an H100 the issue's grid (s_h100.sh), else every GPU test and the sparse rows (s_f2.sh).
cd "$(dirname "$0")/.."
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then echo "H100: s_h100"; bash .exp/s_h100.sh
else echo "not an H100: s_f2"; bash .exp/s_f2.sh; fi
