#!/usr/bin/env bash
# GPU check: bash tools/gpu_check.sh OUT_DIR [--dry-run] [--budget-s S] [--layers N], from any directory (OUT_DIR
# resolves there); options after OUT_DIR go to tools/gpu/check.py: the time budget, default 450 s; benchmark layers,
# default: fit. On the GPU machine (Python 3.12, no network) it installs gpu_wheels/*.whl (made here by
# tools/gpu_wheels.sh) into a temporary folder, points megapack's asset cache at gpu_wheels/cache, and runs
# `python3 -m tools.gpu.check` in the repository root: step 1 checks correctness on the device, step 2 measures
# packed vs padded training. Results: OUT_DIR/gpu_check.json and .md.
# --dry-run: the same on the CPU with a tiny shape and the current environment (no install), found as the launchers
# find it (examples/find_megapack.sh: a `megapack` on PATH, else this checkout's .venv). PYTHON=... overrides the
# interpreter in both modes (default on the GPU machine: python3). This checkout's megapack and tools/ come first on
# PYTHONPATH either way.
set -euo pipefail
started="$(date +%s.%N)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: bash tools/gpu_check.sh OUT_DIR [--dry-run]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the driver runs from the repository root
dry=0
for arg in "$@"; do case "$arg" in --dry-run) dry=1 ;; esac; done
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
  case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac  # a relative path: from here
  echo "[megapack] using PYTHON=$py"
elif [ "$dry" -eq 1 ]; then
  source "$root/examples/find_megapack.sh"  # sets PYTHON (the megapack environment's python), prints which
  py="$PYTHON"
else
  py=python3  # the GPU image's interpreter; megapack's requirements come from gpu_wheels/ below
fi
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
"$py" -m tools.gpu.check "$out" --started-at "$started" "$@"
