#!/usr/bin/env bash
# Sparse attention (DeepSeek-V3.2) on the GPU's XLA, first run (carry [".exp"]; at most 9 minutes, not timed yet):
# its tests (never run on a GPU: they ran on CPUs only), then the benchmark's sparse rows, FP8 and bf16 caches,
# topk 2048, b 128, s_q 1 and 2, h_q 64 and 128 (DeepSeek-V3.2's heads), s_k 8192 and 32768. No kernel: these are
# the XLA path's numbers, the baseline a sparse kernel would be measured against.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
# No build: sparse attention is XLA, and the checkout runs without the extension (the dense calls of the module
# tests then run the reference). That leaves the 10 minutes to the tests and the two bench calls.
timeout 200 python3 -m pytest -q -x tests/test_sparse.py tests/test_fp8_cache.py tests/test_mla_module.py \
  -k "sparse or fp8 or nan or wide or chunked" > $OUT/sparse_tests.txt 2>&1
echo "tests rc=$? t=$((SECONDS-t0))"; tail -n 5 $OUT/sparse_tests.txt
for FMT in --fp8 ""; do
  timeout 180 python3 -m jax_flashmla.bench --sparse-topk 2048 $FMT --seqlen 8192,32768 --s-q 1,2 --h-q 64,128 \
    --repeats 3 --warmup 1 --out /tmp/sparse${FMT#--} > /tmp/sparse${FMT#--}.txt 2>&1
  echo "bench $FMT rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ |NOTE" /tmp/sparse${FMT#--}.txt
done
cat /tmp/sparse*.txt > $OUT/sparse_tables.txt
python3 -c "
import json,glob; r=[x for f in sorted(glob.glob('/tmp/sparse*/results.json')) for x in json.load(open(f))]
json.dump(r, open('$OUT/sparse_xla.json','w'), indent=1); print(len(r), 'records')"
