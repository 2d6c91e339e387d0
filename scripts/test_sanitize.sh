#!/usr/bin/env bash
# The CPU tests under AddressSanitizer and UndefinedBehaviorSanitizer: a CPU-only build in build-asan
# with -fsanitize=address,undefined. Any report fails the run (halt_on_error, no recovery).
#   HATTN_ASAN_BUILD_DIR  build folder (default: build-asan)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${HATTN_ASAN_BUILD_DIR:-build-asan}"
jobs="$(nproc 2>/dev/null || echo 2)"

bash scripts/setup.sh

generator=()
if [[ ! -f "$build/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
# RelWithDebInfo: sanitizer reports with line numbers, at a speed the CI budget allows.
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DHATTN_SANITIZE=ON -DHATTN_CUDA=OFF -DHATTN_BUILD_BENCHMARKS=OFF -DHATTN_BUILD_EXAMPLES=OFF -DHATTN_BUILD_EVAL=OFF
cmake --build "$build" --parallel "$jobs"

export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# The package test installs and builds a separate project: nothing for the sanitizers to see there.
ctest --test-dir "$build" --output-on-failure --parallel "$jobs" --label-exclude package
