#!/usr/bin/env bash
# Set up, configure, build the quickstart example and run it; arguments go to the example
# (try --help).
#   HATTN_BUILD_DIR   build folder (default: build)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build="${HATTN_BUILD_DIR:-build}"
jobs="$(nproc 2>/dev/null || echo 2)"

bash scripts/setup.sh >&2

generator=()
if [[ ! -f "$build/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" --parallel "$jobs" --target hattn_quickstart >&2

# The target is hattn_quickstart; its file may carry another OUTPUT_NAME (hattn-quickstart).
exe="$(find "$build/examples" "$build" -maxdepth 2 -type f \( -name hattn-quickstart -o -name hattn_quickstart \) \
  -perm -u+x -print -quit 2>/dev/null || true)"
[[ -n "$exe" ]] || { echo "run_example: hattn_quickstart was not built under $build" >&2; exit 1; }
exec "$exe" "$@"
