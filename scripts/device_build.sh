# Sourced (from the repository root) by the one-call driver scripts kept under benchmarks/*_logs/: the shared
# environment (gpu_env.sh), the package built and installed, and with --flashmla FlashMLA's SM90 dense decode
# built in the background for scripts/flashmla_ab.py from .fm/ (a checkout of its csrc, carried like .whl/).
# Sets t0 (seconds at the start); writes $OUT/build.log and $OUT/build_flashmla.log; stops the calling script when
# the extension is unusable. With --flashmla, call wait_flashmla before the first use of FlashMLA.
source scripts/gpu_env.sh
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader
flashmla_build=
if [ "${1:-}" = --flashmla ]; then
  # At the register-usage level FlashMLA's setup.py passes, which flashmla_ab.py uses by default.
  python3 -c "import pathlib, sys; sys.path.insert(0, 'scripts'); import flashmla_ab; \
flashmla_ab.build_flashmla(pathlib.Path('.fm').resolve(), pathlib.Path('/tmp/flashmla_ab_build'), 10)" \
    > "$OUT/build_flashmla.log" 2>&1 &
  flashmla_build=$!
fi
python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1
echo "build rc=$? t=$((SECONDS - t0))"
python3 -c "import jax_flashmla as j; assert j.kernels_available(), j.why_kernels_unavailable()" \
  || { tail -n 30 "$OUT/build.log"; exit 1; }
wait_flashmla() {
  [ -n "$flashmla_build" ] || return 0
  wait "$flashmla_build"
  echo "FlashMLA build rc=$? t=$((SECONDS - t0)) $(tail -n 1 "$OUT/build_flashmla.log" | cut -c1-120)"
}
