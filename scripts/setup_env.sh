#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv, or $DINOCELL_VENV) with dinocell and its extras.
# Sourced by scripts/test.sh and launch_ssl.sh so that both work on a fresh machine with only Python >= 3.10.
# Re-installs only when pyproject.toml changed since the last successful install (stamp file in the venv).
# Usage: source scripts/setup_env.sh [extras]   (default extras: none; tests use "dev")
set -euo pipefail
_dinocell_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DINOCELL_VENV="${DINOCELL_VENV:-$_dinocell_root/.venv}"
_extras="${1:-}"
_python="${DINOCELL_BASE_PYTHON:-python3}"

if [ ! -x "$DINOCELL_VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $DINOCELL_VENV" >&2
    "$_python" -m venv "$DINOCELL_VENV"
fi
PY="$DINOCELL_VENV/bin/python"
_stamp="$DINOCELL_VENV/.dinocell-installed-${_extras:-base}"
_want="$(sha256sum "$_dinocell_root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ]; then
    # torch first and pinned, so pip does not pull a different build through a dependency range.
    # Set DINOCELL_TORCH_SPEC (e.g. "torch==2.14.1") to choose another build; an importable torch is kept.
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[setup] installing ${DINOCELL_TORCH_SPEC:-torch==2.13.0}" >&2
        "$PY" -m pip install -q "${DINOCELL_TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "[setup] installing dinocell${_extras:+[$_extras]} into $DINOCELL_VENV" >&2
    "$PY" -m pip install -q -e "$_dinocell_root${_extras:+[$_extras]}"
    echo "$_want" > "$_stamp"
fi
export PATH="$DINOCELL_VENV/bin:$PATH"
