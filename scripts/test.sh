#!/usr/bin/env bash
# Set up, configure (CUDA auto-detected), build with every core, run the whole test suite.
# Exits non-zero on any failure. GPU tests skip themselves when no device is present.
#   HATTN_BUILD_DIR   build folder (default: build)
#   HATTN_CMAKE_ARGS  extra configure arguments, e.g. "-DHATTN_CUDA=OFF"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${HATTN_BUILD_DIR:-build}"
jobs="$(nproc 2>/dev/null || echo 2)"

bash scripts/setup.sh

generator=()
if [[ ! -f "$build/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
# shellcheck disable=SC2086  # HATTN_CMAKE_ARGS is a list of words on purpose
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release ${HATTN_CMAKE_ARGS:-}
cmake --build "$build" --parallel "$jobs"
ctest --test-dir "$build" --output-on-failure --parallel "$jobs"
