#!/usr/bin/env bash
# Sourced by the launchers: make `megapack` (and its python and torchrun) callable without activating anything and
# without changing the caller's directory, so relative paths in configs and overrides resolve where the user stands.
# A `megapack` already on PATH wins (an activated venv, a pip install); else this checkout's .venv (made by
# `bash examples/quickstart.sh`). Prints which one it uses.
MEGAPACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v megapack >/dev/null 2>&1; then
    if [[ -x "$MEGAPACK_ROOT/.venv/bin/megapack" ]]; then
        export PATH="$MEGAPACK_ROOT/.venv/bin:$PATH"
    else
        echo "error: no megapack on PATH and no $MEGAPACK_ROOT/.venv: run bash $MEGAPACK_ROOT/examples/quickstart.sh" \
             "(creates .venv) or pip install -e $MEGAPACK_ROOT" >&2
        exit 1
    fi
fi
MEGAPACK_BIN="$(dirname "$(command -v megapack)")"
PYTHON="$MEGAPACK_BIN/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
echo "[megapack] using $MEGAPACK_BIN/megapack"
