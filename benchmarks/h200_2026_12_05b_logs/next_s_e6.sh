#!/usr/bin/env bash
# Next session (carry [".whl", ".exp", ".fm"]): FlashMLA built as its setup.py builds it (ptxas
# --register-usage-level=10) and as every earlier comparison built it (the default, 5), each beside our head, on the
# memory and compute rows. Says whether FlashMLA as shipped is further ahead than RESULTS.md reports, and whether the
# level moves FlashMLA (a predictor for s_e5's rul10). About 9 minutes; the two FlashMLA builds run in parallel.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
for level in 5 10; do
  python3 -c "import pathlib, sys; sys.path.insert(0, 'scripts'); import flashmla_ab; \
flashmla_ab.build_flashmla(pathlib.Path('.fm').resolve(), pathlib.Path('/tmp/flashmla_ab_build'), $level)" \
    > /tmp/build_flashmla_$level.log 2>&1 &
done
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" 2>/dev/null \
  || { python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"; }
wait; echo "FlashMLA builds t=$((SECONDS-t0))"; tail -n 2 /tmp/build_flashmla_*.log | cut -c1-160
for level in 10 5; do
  timeout 240 python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16,2x128 --rounds 2 \
    --register-usage-level $level --out $OUT/ab_level$level > /tmp/ab_level$level.log 2>&1
  echo "FlashMLA level $level: rc=$? t=$((SECONDS-t0))"; grep "^s_k" /tmp/ab_level$level.log
done
cat /tmp/ab_level*.log /tmp/build_flashmla_*.log > $OUT/logs.txt
