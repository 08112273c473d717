#!/usr/bin/env bash
# Create .venv (or $VENV) and install everything the project needs: torch 2.13.0 (CPU) first, then the package with
# its dev tools (demo and export extras included), and Debian's Chromium for the demo's browser test when it can (root +
# apt). Idempotent: a second run only checks. Never installs torchvision. pip's own PIP_CONSTRAINT pins versions
# (scripts/test_floor.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The demo's browser test drives Debian's Chromium (playwright's own browser downloads are not reachable offline).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "warning: could not install chromium; the demo's browser test will be skipped" >&2
fi
if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "torchvision is installed in $VENV; it breaks transformers with this torch build: pip uninstall torchvision" >&2
  exit 1
fi
