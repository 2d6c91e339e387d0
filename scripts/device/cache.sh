#!/usr/bin/env bash
# HBM page cache figures (issue 6): runs the GPU cache tests (then compute-sanitizer memcheck and
# racecheck on the short ones) and bench_hbm_cache, which writes docs/results/hbm_cache.json.
# Env: BUILD (configured + built Release dir with CUDA), OUT (folder whose files come back),
# HATTN_COMMIT (recorded in the JSON).
set -euo pipefail
: "${BUILD:?BUILD must name a build dir}" "${OUT:?OUT must name an output dir}"
export HATTN_COMMIT="${HATTN_COMMIT:-unknown}"
mkdir -p "$OUT" docs/results
ninja -C "$BUILD" test_kv_cache_gpu test_kv_cache_model bench_hbm_cache
"$BUILD/tests/test_kv_cache_gpu" 2>&1 | tee "$OUT/cache_gpu_test.log" || echo "cache GPU tests FAILED (see $OUT/cache_gpu_test.log)"
# memcheck also takes the back-to-back stress (~1 s natively): the device-side commit path; racecheck
# (shared memory) stays on the short set, which runs every kernel and the plan.
short='*WithoutEvictions*:*GatherSmallGrid*:*BadInput*:*Resize*'
for tool in memcheck racecheck; do
  filter="$short"
  [ "$tool" = memcheck ] && filter="$short:*CommitsOnTheDevice*"
  GTEST_BRIEF=1 compute-sanitizer --tool "$tool" --error-exitcode 9 "$BUILD/tests/test_kv_cache_gpu" \
    --gtest_filter="$filter" > "$OUT/cache_sanitize_$tool.log" 2>&1 && echo "$tool clean" ||
    echo "$tool FAILED (see $OUT/cache_sanitize_$tool.log)"
done
"$BUILD/benchmarks/bench_hbm_cache" --results=docs/results 2>&1 | tee "$OUT/cache_bench.log"
cp docs/results/hbm_cache.json "$OUT/hbm_cache.json"
