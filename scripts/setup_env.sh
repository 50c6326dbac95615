#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned requirements + this package; sourced by
# run.sh (runtime pins: requirements.txt) and test.sh (REQUIREMENTS=requirements-test.txt:
# the same plus the test tools). Re-installs only when those files or pyproject.toml change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS=${REQUIREMENTS:-requirements.txt}
PYTHON_BIN=${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "setup: creating $ROOT/.venv with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
STAMP="$ROOT/.venv/.installed-$(cat "$ROOT/requirements.txt" "$ROOT/$REQUIREMENTS" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "setup: installing the pins of $REQUIREMENTS (torch 2.14.1, torchvision 0.29.1, timm ...)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r "$ROOT/$REQUIREMENTS"
  python -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
  rm -f "$ROOT"/.venv/.installed-*; touch "$STAMP"
fi
