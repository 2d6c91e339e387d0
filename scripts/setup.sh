#!/usr/bin/env bash
# Installs the build dependencies with apt-get, only those that are missing; runs apt-get update only
# when something is. Idempotent. Works as root (no sudo needed) or through sudo otherwise.
# HATTN_SKIP_SETUP=1 skips it (machines provisioned another way).
set -euo pipefail

packages=(cmake ninja-build g++ libeigen3-dev libxsimd-dev libcli11-dev libgtest-dev libbenchmark-dev)

if [[ "${HATTN_SKIP_SETUP:-0}" == 1 ]]; then
  echo "setup: skipped (HATTN_SKIP_SETUP=1)"
  exit 0
fi
if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: no dpkg/apt-get here; install these yourself if the configure step fails: ${packages[*]}" >&2
  exit 0
fi

missing=()
for p in "${packages[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

sudo=()
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
