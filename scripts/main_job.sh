#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job offline: build a tiny CLIP, fit MROVSeg on a synthetic high-res
# scene, segment it and write the checkpoint, a label map, an overlay picture and results.json to outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m training.demo --out "${1:-outputs/demo}"
