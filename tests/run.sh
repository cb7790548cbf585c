#!/usr/bin/env bash
# The test command: set up the environment (idempotent), then run the whole suite (what CI runs).
#   bash tests/run.sh                  everything
#   bash tests/run.sh --fast           everything not marked multiprocess, slurm, slow or gpu (tests/pytest.ini):
#                                      a few minutes on 2 cores; no Slurm install; prints what it left out
#   bash tests/run.sh -m multiprocess  one kind (or slurm, slow, gpu); any other argument goes to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fast=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then fast=1; else args+=("$arg"); fi
done
source "$root/examples/setup_env.sh"
cd "$root"
if [ "$fast" -eq 1 ]; then  # no Slurm test runs: no Slurm install; a later -m in the arguments wins
  exec python -m pytest -q -ra tests -m "not (multiprocess or slurm or slow or gpu)" ${args[@]+"${args[@]}"}
fi
bash "$root/tests/install_slurm.sh"   # the Slurm daemons for tests/test_slurm.py (root + apt only; else they skip)
exec python -m pytest -q -ra tests ${args[@]+"${args[@]}"}
