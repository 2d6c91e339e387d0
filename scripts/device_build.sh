#!/usr/bin/env bash
# Builds the whole project (Release, CUDA for sm_90) on the GPU machine. xsimd is not installed there:
# its Debian package travels in .deps/ (see README "Benchmarks on a GPU machine") and is unpacked here.
# Usage: scripts/device_build.sh [build-dir]   (default build-device)
set -euo pipefail
BUILD=${1:-build-device}
XS=/tmp/hattn-xsimd
if [ ! -d /usr/include/xsimd ] && [ ! -d "$XS/usr/include/xsimd" ]; then
  deb=$(ls .deps/libxsimd-dev_*.deb 2>/dev/null | head -1 || true)
  [ -n "$deb" ] || { echo "xsimd missing: put libxsimd-dev_*.deb in .deps/ (apt-get download libxsimd-dev)"; exit 1; }
  dpkg -x "$deb" "$XS"
fi
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="$XS/usr" -DHATTN_CUDA=ON
ninja -C "$BUILD" -j"$(nproc)"
