#!/usr/bin/env bash
# CUDA kernels on the GPU machine (issue 5). Env: BUILD (built Release tree with CUDA), OUT (logs and
# files that come back), HATTN_COMMIT. Measures the PyTorch baselines first (other components read
# $OUT/torch_baselines.json), then the kernel microbenchmarks (Google Benchmark's JSON in
# docs/results/bench_cuda_kernels.json, and bench_cuda_kernels_no_pdl.json for the step's kernels with
# HATTN_PROGRAMMATIC_LAUNCH=0), then writes docs/results/cuda_kernels.json.
set -uo pipefail
: "${BUILD:?BUILD must name a built tree}" "${OUT:?OUT must name a folder}"
export HATTN_COMMIT=${HATTN_COMMIT:-unknown}
mkdir -p "$OUT" docs/results
status=0
# TORCH_QUICK=1: only the shapes the kernel figures use (the e2e and CPU figures need the full set).
PYTHONUNBUFFERED=1 python3 benchmarks/torch_baselines.py --out "$OUT/torch_baselines.json" ${TORCH_QUICK:+--kernel-shapes-only} \
  > "$OUT/torch_baselines.log" 2>&1 || { echo "torch_baselines.py failed"; tail -20 "$OUT/torch_baselines.log"; status=1; }
bench="$BUILD/benchmarks/bench_cuda_kernels"
[ -x "$bench" ] || { echo "missing $bench"; exit 1; }
"$bench" --benchmark_out=docs/results/bench_cuda_kernels.json --benchmark_out_format=json \
  > "$OUT/bench_cuda_kernels.log" 2>&1 || { echo "microbenchmarks failed"; tail -20 "$OUT/bench_cuda_kernels.log"; status=1; }
# The step's kernels without programmatic dependent launch, for the A/B in docs/performance.md.
HATTN_PROGRAMMATIC_LAUNCH=0 "$bench" --benchmark_filter='Sparse5|SelectTopK' \
  --benchmark_out=docs/results/bench_cuda_kernels_no_pdl.json --benchmark_out_format=json \
  > "$OUT/bench_cuda_kernels_no_pdl.log" 2>&1 || { echo "microbenchmarks without PDL failed"; status=1; }
"$bench" --figures docs/results/cuda_kernels.json --torch "$OUT/torch_baselines.json" \
  > "$OUT/cuda_figures.log" 2>&1 || { echo "figures failed"; tail -20 "$OUT/cuda_figures.log"; status=1; }
cat "$OUT/cuda_figures.log"
exit $status
