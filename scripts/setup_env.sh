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
    # torch first and pinned, so pip does not pull a different build through a dependency range. An importable
    # torch + torchvision pair is kept. DINOCELL_TORCH_SPEC chooses other versions (torch and a torchvision built for
    # it); DINOCELL_TORCH_INDEX_URL another package index, e.g. https://download.pytorch.org/whl/cpu (CPU only).
    if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
        read -ra _torch_spec <<< "${DINOCELL_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
        _index=()
        if [ -n "${DINOCELL_TORCH_INDEX_URL:-}" ]; then
            _index=(--index-url "$DINOCELL_TORCH_INDEX_URL")
            echo "[setup] installing ${_torch_spec[*]} from $DINOCELL_TORCH_INDEX_URL (progress below)" >&2
        else
            echo "[setup] installing ${_torch_spec[*]} from PyPI (progress below): the CUDA build, about 5.5 GB" \
                "with its CUDA libraries, several minutes. For a CPU-only build of a few hundred MB, stop and" \
                "rerun with DINOCELL_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
        fi
        "$PY" -m pip install --progress-bar on "${_index[@]}" "${_torch_spec[@]}" >&2
    fi
    echo "[setup] installing dinocell${_extras:+[$_extras]} and its dependencies into $DINOCELL_VENV" >&2
    "$PY" -m pip install -q -e "$_dinocell_root${_extras:+[$_extras]}" >&2
    echo "$_want" > "$_stamp"
    echo "[setup] done: run 'source $DINOCELL_VENV/bin/activate' to use dinocell and python from this environment" >&2
fi
export PATH="$DINOCELL_VENV/bin:$PATH"
