#!/usr/bin/env bash
# Create .venv with Python 3.12 and install megatron_latent (editable) with the dev extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
pick_python() {
  for cand in "${PYTHON:-}" python3.12 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then  # pyenv-managed 3.12 that is not the default
    local v; v=$(pyenv versions --bare | grep -E '^3\.12' | tail -n 1)
    if [ -n "$v" ]; then echo "env PYENV_VERSION=$v python3.12"; return; fi
  fi
  echo "error: Python 3.12 not found (megatron-core 0.19 needs it); set PYTHON=/path/to/python3.12" >&2
  exit 1
}
if [ ! -x .venv/bin/python ]; then
  $(pick_python) -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
