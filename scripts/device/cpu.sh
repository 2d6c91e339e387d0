#!/usr/bin/env bash
# CPU decode kernel on the device host (issue 4). Env: BUILD (a built Release tree), OUT (logs and
# files that come back), HATTN_COMMIT, TORCH_JSON (PyTorch baselines of this run; default
# $OUT/torch_baselines.json, else PyTorch's CPU SDPA is measured here), HATTN_CPU_BENCH_ARGS (extra
# benchmark flags, e.g. "--quick --dram_mib=256" for a check on a small machine). Runs the CPU tests
# of this host's paths (AVX-512 BF16 cannot be tested on most development machines), then the kernel
# benchmark, which writes docs/results/cpu_kernel.json itself. Everything is logged to
# $OUT/cpu_bench.log. About 5 minutes.
set -euo pipefail
: "${BUILD:?BUILD must name a built tree}" "${OUT:?OUT must name a folder}"
export HATTN_COMMIT=${HATTN_COMMIT:-unknown}
torch_json=${TORCH_JSON:-$OUT/torch_baselines.json}  # measured here (--cpu-only) when missing
mkdir -p "$OUT" docs/results
log="$OUT/cpu_bench.log"
: > "$log"
say() { echo "$@" | tee -a "$log"; }

say "== cpu: $(date -u +%FT%TZ) commit $HATTN_COMMIT"
{ lscpu || true; grep -E 'MemTotal' /proc/meminfo || true; } >> "$log" 2>&1

# Build what this script needs if the driver's build skipped it (cheap when up to date).
targets=(bench_cpu_decode)
all_targets="$(ninja -C "$BUILD" -t targets all 2>/dev/null || true)"
for t in test_cpu_decode test_cpu_thread_pool test_cpu_select; do
  if grep -q "^$t:" <<< "$all_targets"; then targets+=("$t"); fi
done
ninja -C "$BUILD" "${targets[@]}" >> "$log" 2>&1

status=0
# 1. Correctness of every path this CPU runs (the dev machines have no AVX-512). A failure is
#    reported but does not stop the benchmark: it also checks each path against the generic one.
if [ -x "$BUILD/tests/test_cpu_decode" ]; then
  for t in test_cpu_thread_pool test_cpu_select test_cpu_decode; do
    if "$BUILD/tests/$t" > "$OUT/$t.log" 2>&1; then
      say "$t: passed ($(grep -c '^\[       OK' "$OUT/$t.log") ok, $(grep -c '^\[  SKIPPED' "$OUT/$t.log") skipped lines)"
    else
      say "$t: FAILED"; grep -E '^\[  FAILED|Failure' "$OUT/$t.log" | head -20 | tee -a "$log"; status=1
    fi
  done
  grep -E 'cpu path|detected' "$OUT/test_cpu_decode.log" | tee -a "$log" || true
else
  say "tests not built in $BUILD: skipped"
fi

# 2. The benchmark. Google Benchmark's JSON goes to $OUT/bench_cpu_decode.json; the figures of the
#    issue to docs/results/cpu_kernel.json (and a copy in $OUT).
if [ ! -f "$torch_json" ]; then  # PyTorch's CPU SDPA alone takes seconds (the GPU sweep does not run)
  torch_json=$OUT/torch_cpu.json
  rm -f "$torch_json"  # never a stale file from an earlier run in the same OUT
  python3 benchmarks/torch_baselines.py --cpu-only --out "$torch_json" >> "$log" 2>&1 ||
    say "note: torch_baselines.py --cpu-only failed: cpu_vs_torch_sdpa_128k will be null"
fi
bench="$BUILD/benchmarks/bench_cpu_decode"
if "$bench" --benchmark_min_time=0.3 --benchmark_out="$OUT/bench_cpu_decode.json" --benchmark_out_format=json \
    --result_json=docs/results/cpu_kernel.json --torch_json="$torch_json" --commit="$HATTN_COMMIT" --dram_mib=4096 \
    ${HATTN_CPU_BENCH_ARGS:-} >> "$log" 2>&1; then
  cp docs/results/cpu_kernel.json "$OUT/cpu_kernel.json"
  say "wrote docs/results/cpu_kernel.json"
  cat docs/results/cpu_kernel.json | tee -a "$log"
else
  say "bench_cpu_decode FAILED"; tail -30 "$log"; status=1
fi
exit $status
