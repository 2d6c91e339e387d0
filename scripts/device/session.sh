#!/usr/bin/env bash
# Everything a short device lease allows, in one call and in order of value, each part cut to the
# time left (BUDGET seconds, default 560, inside the call's 600 s limit):
#   build the GPU test and benchmark targets; the CUDA kernel tests; the step's timeline (phase marks);
#   the CUDA kernel figures
#   (scripts/device/cuda.sh, PyTorch's quick shapes); compute-sanitizer memcheck and racecheck on the
#   selection, two-level and merge suites; the engine's and cache's GPU tests, plain and with
#   HATTN_FUSED_STEP=1; then the end-to-end 128K batch 1 figures (scripts/device/e2e.sh without the
#   sweep, the phases and the accuracy harness) while time is left.
# Logs and every docs/results/*.json go into $OUT/logs.tgz (a device call returns only 8 files).
# Env: OUT (required), HATTN_COMMIT, BUDGET, E2E=0 (skip the e2e part), CUDA=0 (skip the kernel figures of
# cuda.sh: PyTorch's quick shapes are then timed alone, for the e2e part), SANITIZERS (default
# "memcheck racecheck"), E2E_* (passed to e2e.sh).
set -uo pipefail
: "${OUT:?OUT must name a folder}"
export BUILD=${BUILD:-build-device} HATTN_COMMIT=${HATTN_COMMIT:-unknown}
L=$OUT/l
mkdir -p "$L"
T0=$(date +%s)
t() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$L/times.log"; }
left() { echo $((${BUDGET:-560} - ($(date +%s) - T0))); }
cap() { local want=$1 have; have=$(($(left) - ${2:-0})); echo $((have < want ? (have > 5 ? have : 5) : want)); }
save() {
  mkdir -p "$L/results"
  cp docs/results/*.json "$L/results/" 2>/dev/null
  mv "$OUT"/*.log "$OUT"/torch_baselines.json "$L/" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$OUT" l
}
trap save EXIT
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$L/gpu.txt" 2>&1
XS=/tmp/hattn-xsimd
[ -d "$XS/usr/include/xsimd" ] || dpkg -x .deps/libxsimd-dev_*.deb "$XS"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$XS/usr" \
  -DHATTN_CUDA=ON > "$L/build.log" 2>&1
timeout "$(cap 300)" ninja -C "$BUILD" hattn_cuda_kernels_test test_hybrid_attention_gpu test_kv_cache_gpu \
  bench_cuda_kernels hattn-bench hattn-eval >> "$L/build.log" 2>&1
t "build rc=$?"
tail -3 "$L/build.log"
timeout "$(cap 150)" "$BUILD/tests/hattn_cuda_kernels_test" --gtest_brief=1 > "$L/kernels_test.log" 2>&1
t "kernel tests rc=$?"
tail -4 "$L/kernels_test.log"
# Where the fused two-level step's time goes: its kernels' phase marks and the chains of its launches
# (bench_cuda_kernels --timeline; notes/cuda.md, tenth session).
timeout "$(cap 60)" "$BUILD/benchmarks/bench_cuda_kernels" --timeline > "$L/timeline.txt" 2>&1
t "timeline rc=$?"
HATTN_PROGRAMMATIC_LAUNCH=0 timeout "$(cap 60)" "$BUILD/benchmarks/bench_cuda_kernels" --timeline \
  > "$L/timeline_without_pdl.txt" 2>&1
t "timeline without PDL rc=$?"
# Registers and spills of the decode's instantiations (the staging and merge variants included).
cuobjdump -res-usage "$BUILD/CMakeFiles/hattn.dir/cuda/sparse_decode.cu.o" 2>&1 | grep -A1 TensorCoreDecode |
  grep -oE 'Lb[01]ELb[01]E|REG:[0-9]+ STACK:[0-9]+|LOCAL:[0-9]+' | paste -d' ' - - - > "$L/decode_registers.txt"
if [ "${CUDA:-1}" = 1 ]; then
  TORCH_QUICK=1 timeout "$(cap 300 60)" bash scripts/device/cuda.sh > "$L/cuda_sh.log" 2>&1
  t "cuda.sh rc=$?"
  tail -12 "$L/cuda_sh.log"
else
  timeout "$(cap 120 60)" python3 benchmarks/torch_baselines.py --out "$OUT/torch_baselines.json" --kernel-shapes-only \
    > "$L/torch_quick.log" 2>&1
  t "torch quick rc=$?"
fi
[ -s "$OUT/torch_baselines.json" ] && cp "$OUT/torch_baselines.json" /tmp/hattn-torch.json
for tool in ${SANITIZERS:-memcheck racecheck}; do
  GTEST_BRIEF=1 timeout "$(cap 150 60)" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    "$BUILD/tests/hattn_cuda_kernels_test" \
    --gtest_filter='CudaSelect*:*TwoLevel*:CudaSparseDecodeMerge*:CudaSparseDecodeStaging*:CudaGather*' \
    > "$L/sanitize_$tool.log" 2>&1
  t "$tool rc=$? $(grep 'ERROR SUMMARY' "$L/sanitize_$tool.log" | tail -1)"
done
GTEST_BRIEF=1 timeout "$(cap 90 60)" compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/tests/test_kv_cache_gpu" \
  --gtest_filter='*Staged*' > "$L/sanitize_memcheck_cache.log" 2>&1
t "memcheck cache rc=$? $(grep 'ERROR SUMMARY' "$L/sanitize_memcheck_cache.log" | tail -1)"
for b in test_hybrid_attention_gpu test_kv_cache_gpu; do
  for fused in 0 1; do
    HATTN_FUSED_STEP=$fused timeout "$(cap 60 30)" "$BUILD/tests/$b" --gtest_brief=1 > "$L/${b}_fused$fused.log" 2>&1
    t "$b HATTN_FUSED_STEP=$fused rc=$? $(tail -1 "$L/${b}_fused$fused.log")"
  done
done
if [ "$(left)" -gt 200 ] && [ "${E2E:-1}" = 1 ]; then
  [ -s /tmp/hattn-torch.json ] && export TORCH_JSON=/tmp/hattn-torch.json
  E2E_SWEEP=${E2E_SWEEP:-0} E2E_EVAL=${E2E_EVAL:-0} E2E_PHASES=${E2E_PHASES:-0} OUT="$L" timeout "$(cap 420 15)" bash scripts/device/e2e.sh > "$L/e2e_sh.log" 2>&1
  t "e2e.sh rc=$?"
  grep -E '^\| 131072' "$L/e2e_sh.log" | head -20
fi
