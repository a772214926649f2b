#!/usr/bin/env bash
# Next session's first call (carry [".whl", ".exp", ".fm"]; NOTES.md version 2.21, Next): on an H100, FlashMLA
# beside the current defaults (s_h1.sh; then call s_e3.sh at once, for the profile); on any other GPU the ring's
# depth (s_h2.sh), which needs no FlashMLA. Copy next_s_h1.sh, next_s_h2.sh (here) and
# ../h200_2026_12_05b_logs/next_s_e3.sh into .exp/ without the next_ prefix first.
cd "$(dirname "$0")/.."
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then echo "H100: s_h1"; bash .exp/s_h1.sh
else echo "not an H100: s_h2"; bash .exp/s_h2.sh; fi
