#!/usr/bin/env bash
# On the GPU machine: build, then run every component's benchmark script (scripts/device/*.sh) in a
# fixed order; each writes its docs/results/*.json itself. Everything (results and logs) is packed into
# $OUT/device_results.tgz. HATTN_COMMIT names the commit the figures belong to.
set -uo pipefail
OUT=${OUT:-/tmp/hattn-out}
export BUILD=${BUILD:-build-device}
export HATTN_COMMIT=${HATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LOGS=/tmp/hattn-logs
mkdir -p "$OUT" "$LOGS"
if [ ! -x "$BUILD/tests" ] && [ ! -d "$BUILD/tests" ]; then
  bash scripts/device_build.sh "$BUILD" > "$LOGS/build.log" 2>&1 || { tail -50 "$LOGS/build.log"; exit 1; }
fi
status=0
# cuda first: it also measures the PyTorch baselines that the others compare against.
for component in ${HATTN_COMPONENTS:-cuda cpu cache e2e}; do
  script=scripts/device/$component.sh
  [ -f "$script" ] || { echo "skip $component: no $script"; continue; }
  mkdir -p "$LOGS/$component"
  echo "== $component"
  start=$(date +%s)
  if OUT="$LOGS/$component" TORCH_JSON="${TORCH_JSON:-$LOGS/cuda/torch_baselines.json}" bash "$script" > "$LOGS/$component.log" 2>&1; then
    echo "   ok in $(( $(date +%s) - start )) s"
  else
    echo "   FAILED in $(( $(date +%s) - start )) s"; tail -25 "$LOGS/$component.log"; status=1
  fi
done
cp -r docs/results "$LOGS/results"
tar czf "$OUT/device_results.tgz" -C "$LOGS" .
for f in docs/results/*.json; do echo "--- $f"; head -c 1500 "$f"; echo; done
exit $status
