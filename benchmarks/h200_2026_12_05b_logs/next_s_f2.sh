#!/usr/bin/env bash
# Call 2 (carry [".whl", ".exp"]): every GPU test on the current tree (never run on a GPU since the in-kernel
# merge's removal, the attention sink and the sparse path), then the sparse tests on the GPU's XLA and the sparse
# bench rows at s_k 32768 (indexer + sparse decode on FP8, sparse decode on FP8, then bf16).
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable(); print('kernels ok')" \
  || { tail -n 30 $OUT/build.log; exit 1; }
timeout 330 python3 -m pytest -q -m gpu -n 10 --durations=10 tests/ > /tmp/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$((SECONDS-t0))"; grep -v "PytestBenchmarkWarning\|warnings.warn\|^$" /tmp/gpu_tests.log > $OUT/gpu_tests.log
grep -E "passed|failed|error" $OUT/gpu_tests.log | tail -3; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | head -20
timeout 100 python3 -m pytest -q -x -n 4 tests/test_sparse.py tests/test_fp8_cache.py tests/test_mla_module.py \
  -k "sparse or fp8 or nan or wide or chunked" > $OUT/sparse_tests.txt 2>&1
echo "sparse tests rc=$? t=$((SECONDS-t0))"; tail -n 3 $OUT/sparse_tests.txt
timeout 60 python3 -m pytest -q -x -n 4 tests/test_indexer.py > $OUT/indexer_tests.txt 2>&1
echo "indexer tests rc=$? t=$((SECONDS-t0))"; tail -n 3 $OUT/indexer_tests.txt
i=0
for FMT in "--fp8 --indexer" "--fp8" ""; do
  i=$((i + 1)); left=$((585 - SECONDS + t0)); [ $left -lt 40 ] && break
  timeout $((left / (4 - i) > 40 ? left / (4 - i) : 40)) python3 -m jax_flashmla.bench --sparse-topk 2048 $FMT \
    --seqlen 32768 --s-q 1,2 --h-q 64,128 --repeats 3 --warmup 1 --out /tmp/sparse$i > /tmp/sparse$i.txt 2>&1
  echo "bench $FMT rc=$? t=$((SECONDS-t0))"; grep -E "^ *[0-9]+ +[0-9]+ |NOTE" /tmp/sparse$i.txt
  cat /tmp/sparse*.txt > $OUT/sparse_tables.txt
done
python3 -c "
import json,glob; r=[x for f in sorted(glob.glob('/tmp/sparse*/results.json')) for x in json.load(open(f))]
json.dump(r, open('$OUT/sparse_xla.json','w'), indent=1); print(len(r), 'records')"
