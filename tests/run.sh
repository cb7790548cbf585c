#!/usr/bin/env bash
# The test command: set up the environment (idempotent), then run the whole suite (what CI runs).
#   bash tests/run.sh                  everything
#   bash tests/run.sh --fast           everything not marked multiprocess, slurm, slow or gpu (tests/pytest.ini):
#                                      a few minutes on 2 cores; no Slurm install; prints what it left out
#   bash tests/run.sh -m multiprocess  one kind (or slurm, slow, gpu); any other argument goes to pytest, and
#                                      test paths given replace the default `tests`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fast=0
where=(tests)
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    fast=1
    continue
  fi
  [[ "$arg" != -* && -e "$root/${arg%%::*}" || "$arg" != -* && -e "${arg%%::*}" ]] && where=()
  args+=("$arg")
done
source "$root/examples/setup_env.sh"
cd "$root"
if [ "$fast" -eq 1 ]; then  # no Slurm test runs: no Slurm install; a later -m in the arguments wins
  exec python -m pytest -q -ra ${where[@]+"${where[@]}"} -m "not (multiprocess or slurm or slow or gpu)" \
    ${args[@]+"${args[@]}"}
fi
bash "$root/tests/install_slurm.sh"   # the Slurm daemons for tests/test_slurm.py (root + apt only; else they skip)
exec python -m pytest -q -ra ${where[@]+"${where[@]}"} ${args[@]+"${args[@]}"}
