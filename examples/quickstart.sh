#!/usr/bin/env bash
# Quickstart: set up the checkout's .venv (idempotent), then run megapack's main job on embedded defaults.
# Arguments go to `megapack demo`: `bash examples/quickstart.sh --model smollm2` runs the study in miniature on
# SmolLM2-135M-Instruct (real weights; quality and time tables, megapack/MINIATURE.md).
# Works from any directory: the demo's files land in ./runs/demo there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/examples/setup_env.sh"
exec megapack demo "$@"
