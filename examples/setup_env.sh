#!/usr/bin/env bash
# Creates .venv (Python 3.11) if absent and installs torch==2.13.0 first, then megapack with its test and eval extras.
# Idempotent: a stamp holding the hash of setup.py skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${MEGAPACK_PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $py"
  "$py" -m venv "$venv"
fi
stamp="$venv/.megapack-install-stamp"
want="$(sha256sum "$root/setup.py" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch==2.13.0, then megapack[test,eval]"
  log="$venv/megapack-install.log"
  if ! { "$venv/bin/python" -m pip install --disable-pip-version-check "torch==2.13.0" \
         && "$venv/bin/python" -m pip install --disable-pip-version-check -e "$root[test,eval]"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "[setup] install failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
