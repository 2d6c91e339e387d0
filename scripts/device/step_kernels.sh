#!/usr/bin/env bash
# Every kernel of a 128K x 1 fluxion step, alone (docs/performance.md, "128K x 1 at 8265437"): Nsight
# Compute times STEP_LAUNCHES launches (default 36, about one step of 4 layers) after STEP_SKIP
# (default 120; every launch counts, setup ones included, so where this lands is not checked) with
# the SpeedOfLight section, at its base clocks and with cold caches; step_kernels.py
# turns the report into a table. Env: BUILD (built Release tree with CUDA), OUT (logs that come back),
# STEP_ARGS (extra hattn-bench flags, e.g. "--gpu_only_hit_rate 2" to force a CPU share). ncu's
# serialisation slows the step, which can change the scheduler's split: the table lists what ran.
set -uo pipefail
: "${BUILD:?BUILD must name a built tree}" "${OUT:?OUT must name a folder}"
mkdir -p "$OUT"
ninja -C "$BUILD" hattn-bench > "$OUT/step_kernels_build.log" 2>&1 || { echo "build FAILED"; exit 1; }
timeout 150 ncu --section SpeedOfLight --launch-skip "${STEP_SKIP:-120}" --launch-count "${STEP_LAUNCHES:-36}" \
  "$BUILD/eval/hattn-bench" --contexts 131072 --batches 1 --systems fluxion --json '' --orchestrator_json '' \
  --trace '' --warmup 3 --iters 4 ${STEP_ARGS:-} > "$OUT/step_kernels_ncu.txt" 2>&1
status=$?
[ $status = 0 ] || echo "ncu rc=$status (the table below may be partial)"
python3 "$(dirname "$0")/step_kernels.py" "$OUT/step_kernels_ncu.txt" | tee "$OUT/step_kernels.md" || status=1
exit $status
