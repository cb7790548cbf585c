#!/usr/bin/env bash
# GPU check: bash tools/gpu_check.sh OUT_DIR [--dry-run] [--budget-s S] [--layers N], from the repository root
# (options after OUT_DIR go to tools/gpu_check.py: the time budget, default 450 s; benchmark layers, default: fit).
# On the GPU machine (Python 3.12, no network) it installs gpu_wheels/*.whl (made here by tools/gpu_wheels.sh) into a
# temporary folder, points megapack's asset cache at gpu_wheels/cache, and runs tools/gpu_check.py: step 1 checks
# correctness on the device, step 2 measures packed vs padded training. Results: OUT_DIR/gpu_check.json and .md.
# --dry-run: the same on the CPU with a tiny shape and the current environment (no install). PYTHON picks python3.
set -euo pipefail
started="$(date +%s.%N)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: bash tools/gpu_check.sh OUT_DIR [--dry-run]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the driver runs from the repository root
py="${PYTHON:-python3}"
dry=0
for arg in "$@"; do case "$arg" in --dry-run) dry=1 ;; esac; done
if [ "$dry" -eq 0 ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  shopt -s nullglob
  wheels=("$root"/gpu_wheels/*.whl)
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "gpu_check.sh: no wheels in $root/gpu_wheels: run bash tools/gpu_wheels.sh where there is network" >&2
    exit 1
  fi
  "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$tmp/site" \
    "${wheels[@]}"
  export PYTHONPATH="$tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}"
  if [ -d "$root/gpu_wheels/cache" ]; then
    cp -r "$root/gpu_wheels/cache" "$tmp/cache"
    export MEGAPACK_CACHE_DIR="$tmp/cache"
  fi
else
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$root"
"$py" tools/gpu_check.py "$out" --started-at "$started" "$@"
