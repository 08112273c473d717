#!/usr/bin/env bash
# Set up (see setup.sh; $VENV names another virtual environment) and run the whole test suite offline. Extra arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
