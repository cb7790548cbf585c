#!/usr/bin/env bash
# The test command: set up the environment (idempotent), then run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/examples/setup_env.sh"
bash "$root/tests/install_slurm.sh"   # the Slurm daemons for tests/test_slurm.py (root + apt only; else they skip)
cd "$root"
exec python -m pytest -q -ra tests "$@"
