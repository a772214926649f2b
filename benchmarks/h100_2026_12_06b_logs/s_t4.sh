#!/usr/bin/env bash
# Next session (carry [".whl", ".exp"]; copy to .exp/s_t4.sh; NOTES.md version 2.22, Next 3): where today's
# seesaw spends a chunk end. The compute rows fit 53.5 us of fixed time, about 4.8 chunk ends per CTA at ~11 us;
# halving that gives 600 TFLOPS at s_k 4096. The chunk timeline (scripts/trace_chunk_timeline.py, default mode:
# loop top, loads issued, Q landed, first S done, pairs done, sums exchanged, epilogue done) on the s_k 4096
# compute row and on the boundary row (b 512, s_k 1024, about 16 chunks per CTA). About 4 minutes.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
python3 scripts/trace_chunk_timeline.py /tmp/trace_src > $OUT/trace_setup.log 2>&1 || { tail -n 20 $OUT/trace_setup.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target /tmp/variant_trace /tmp/trace_src \
  > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
for row in "--batch 128 --seqlen 4096" "--batch 512 --seqlen 1024 --fixed-lengths"; do
  PYTHONPATH=/tmp/variant_trace:$PYTHONPATH timeout 150 python3 -m jax_flashmla.bench $row --s-q 2 --h-q 128 \
    --causal off --no-baseline --iters 2 --repeats 1 --warmup 1 > /tmp/trace_row.log 2>&1
  echo "row '$row' rc=$? t=$((SECONDS-t0))"; grep TRACE /tmp/trace_row.log | head -40
  grep TRACE /tmp/trace_row.log >> $OUT/trace.log
done
