#!/usr/bin/env bash
# Two-level scoring (Config::coarse_keep) on the device: the kernel pipeline's stage times, and the
# quality it costs on the head zoo against one-pass scoring in the same run. Env: BUILD (built Release
# tree with CUDA), OUT (logs that come back), HATTN_COMMIT. Writes docs/results/quality_two_level.json
# (hattn-eval's own JSON: the default and fluxion_2l at each coarse_keep, GPU backend) and logs.
set -uo pipefail
: "${BUILD:?BUILD must name a built tree}" "${OUT:?OUT must name a folder}"
export HATTN_COMMIT=${HATTN_COMMIT:-unknown}
mkdir -p "$OUT" docs/results
status=0
ninja -C "$BUILD" bench_cuda_kernels hattn-eval > "$OUT/two_level_build.log" 2>&1 || { echo "build FAILED"; exit 1; }
echo "-- kernels: one pass vs two levels (128K and 1M tokens, batch 1, 5%)"
timeout 180 "$BUILD/benchmarks/bench_cuda_kernels" --benchmark_filter='Sparse5|SelectTopK|ScorePages/131072/0' \
  --benchmark_out="$OUT/bench_two_level.json" --benchmark_out_format=json 2>&1 | grep -E '^BM_' || status=1
for keep in ${TWO_LEVEL_KEEPS:-2 4 8}; do
  echo "-- hattn-eval --gpu, fluxion vs fluxion_2l --coarse_keep $keep"
  timeout 200 "$BUILD/eval/hattn-eval" --gpu --systems fluxion fluxion_2l --coarse_keep "$keep" --budgets 0.05 \
    --contexts 32768 131072 --layers 6 --warmup 3 --steps 5 \
    --json "docs/results/quality_two_level_k$keep.json" --md "$OUT/quality_two_level_k$keep.md" 2>&1 |
    grep -E '^\[eval\] ctx|retrieval' || status=1
done
exit $status
