#!/usr/bin/env bash
# The CPU-share A/B of docs/performance.md ("A CPU share of the misses, revisited"): fluxion at 128K x 1
# (4 layers back to back, HBM cache 19% of the KV) GPU-only as the Priority default leaves a warm cache
# (--gpu_only_hit_rate 0.5) against a forced CPU share (--gpu_only_hit_rate 2), alternating, AB_RUNS
# runs each (default 3), with the phase breakdown; then the split kernel's own time under Nsight
# Compute (AB_NCU=0 skips it). Env: BUILD (built Release tree with CUDA), OUT (logs that come back).
# Console rows and phase lines only: no JSON.
set -uo pipefail
: "${BUILD:?BUILD must name a built tree}" "${OUT:?OUT must name a folder}"
mkdir -p "$OUT"
ninja -C "$BUILD" hattn-bench > "$OUT/share_ab_build.log" 2>&1 || { echo "build FAILED"; exit 1; }
bench=("$BUILD/eval/hattn-bench" --contexts 131072 --batches 1 --systems fluxion --json '' --orchestrator_json ''
       --trace '')
status=0
for run in $(seq "${AB_RUNS:-3}"); do
  for arm in gpu_only share; do
    rate=0.5
    [[ $arm == share ]] && rate=2
    echo "-- $arm, run $run"
    timeout 60 "${bench[@]}" --phases --warmup 6 --iters 16 --gpu_only_hit_rate "$rate" 2>&1 |
      grep -E '^\| 131072|^phases' | tee -a "$OUT/share_ab.txt" || status=1
  done
done
if [[ "${AB_NCU:-1}" != 0 ]]; then
  echo "-- ncu: SplitSelectionKernel with the share forced"
  # --launch-skip counts matching launches only: 10 steps x 4 layers give 40 splits, so skip few.
  timeout 120 ncu --kernel-name regex:SplitSelection --launch-skip 8 --launch-count 3 --set full \
    "${bench[@]}" --warmup 4 --iters 6 --gpu_only_hit_rate 2 > "$OUT/share_ab_ncu.txt" 2>&1 || status=1
  grep -E 'Duration|Registers Per Thread|Achieved Occupancy' "$OUT/share_ab_ncu.txt"
fi
exit $status
