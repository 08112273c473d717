#!/usr/bin/env bash
# Create .venv and install everything the project needs: torch 2.13.0 (CPU) first, then the package with its
# dev tools. Idempotent: a second run only checks. Never installs torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
if .venv/bin/python -c "import torchvision" 2>/dev/null; then
  echo "torchvision is installed in .venv; it breaks transformers with this torch build: pip uninstall torchvision" >&2
  exit 1
fi
