#!/usr/bin/env bash
# The test command: set up the environment (idempotent), then run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/examples/setup_env.sh"
cd "$root"
exec python -m pytest -q -ra tests "$@"
