#!/usr/bin/env bash
# Next session, call 3 (carry [".whl", ".exp", ".fm"]): both kernels' s_q 1, h_q 16 rows under Nsight Compute
# (NOTES.md version 2.15, Next 3): time, DRAM bytes and throughput, L2 sectors, and the spread of SM active cycles
# (the tail). flashmla_ab.py's --profile-launches mode has not run before. About 5 minutes with FlashMLA's build.
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
t0=$SECONDS
# FlashMLA is built before ncu starts (ncu would follow the compiler's processes too), beside our own build, at the
# register-usage level flashmla_ab.py uses by default (10, as FlashMLA's setup.py).
python3 -c "import pathlib, sys; sys.path.insert(0, 'scripts'); import flashmla_ab; \
flashmla_ab.build_flashmla(pathlib.Path('.fm').resolve(), pathlib.Path('/tmp/flashmla_ab_build'), 10)" \
  > $OUT/build_flashmla.log 2>&1 &
fm=$!
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" 2>/dev/null \
  || { python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1; echo "build rc=$? t=$((SECONDS-t0))"; }
wait $fm; echo "FlashMLA build rc=$? t=$((SECONDS-t0)) $(tail -n 1 $OUT/build_flashmla.log | cut -c1-120)"
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_active.min,sm__cycles_elapsed.avg,launch__grid_size,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct
timeout 400 ncu --clock-control none --print-units base -k regex:"decode_kernel|combine|flash_fwd" --metrics $M --csv \
  python3 scripts/flashmla_ab.py .fm --seqlen 4096,16384 --pairs 1x16 --profile-launches 2 > $OUT/ncu_ab.csv 2> $OUT/ncu_ab.err
echo "ncu rc=$? t=$((SECONDS-t0))"; tail -n 5 $OUT/ncu_ab.err | cut -c1-200
# One line per launch, the metrics as columns (base units: ns, bytes, cycles, %). The launches come in the script's
# order: every launch of s_k 4096 (ours, then FlashMLA's), then those of s_k 16384.
python3 - "$OUT/ncu_ab.csv" <<'PY'
import collections, csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if len(rows) < 2:
    sys.exit("no profile rows: see ncu_ab.err")
head, body = rows[0], rows[1:]
i, k, m, v = (head.index(c) for c in ("ID", "Kernel Name", "Metric Name", "Metric Value"))
launches = collections.OrderedDict()
for r in body:
    launches.setdefault((int(r[i]), r[k]), {})[r[m]] = r[v]
short = {"gpu__time_duration.sum": "ns", "dram__bytes_read.sum": "dram_B",
         "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%", "sm__cycles_active.avg": "act_avg",
         "sm__cycles_active.max": "act_max", "sm__cycles_active.min": "act_min", "sm__cycles_elapsed.avg": "elapsed",
         "launch__grid_size": "grid", "lts__t_sectors_srcunit_tex_op_read.sum": "l2_rd_sect",
         "lts__t_sector_hit_rate.pct": "l2_hit%"}
print("id  kernel                         " + " ".join("%12s" % s for s in short.values()))
for (ident, name), metrics in launches.items():
    name = "::".join(name.split("(")[0].replace("void ", "").split("::")[-2:])  # e.g. narrow::decode_kernel<...>
    print("%-3d %-30s " % (ident, name[:30]) + " ".join("%12s" % metrics.get(n, "-") for n in short))
PY
