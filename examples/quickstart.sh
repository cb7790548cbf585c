#!/usr/bin/env bash
# Quickstart: set up .venv (idempotent), then run megapack's main job on embedded defaults.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/examples/setup_env.sh"
cd "$root"
exec megapack demo "$@"
