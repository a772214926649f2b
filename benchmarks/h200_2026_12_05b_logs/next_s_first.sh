#!/usr/bin/env bash
# First call (carry [".whl", ".exp"]): on an H100 the issue's grid (s_h100.sh); else the dependent combine's A/B
# (s_e1.sh), whose first steps also run the GPU tests of the files changed since the last full GPU run (c57b082).
cd "$(dirname "$0")/.."
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then echo "H100: s_h100"; bash .exp/s_h100.sh
else echo "not an H100: s_e1"; bash .exp/s_e1.sh; fi
