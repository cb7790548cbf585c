#!/usr/bin/env bash
# Quickstart: set up the checkout's .venv (idempotent), then run megapack's main job on embedded defaults.
# Works from any directory: the demo's files land in ./runs/demo there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/examples/setup_env.sh"
exec megapack demo "$@"
