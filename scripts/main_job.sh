#!/usr/bin/env bash
# The main job, offline, on CPU in a few minutes: set up; generate a synthetic high-resolution dataset; train a
# small MROVSeg (tiny random CLIP) with accelerate; evaluate it (mIoU printed); write its model card; segment a
# new sample into an overlay picture. Everything lands in outputs/ (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${1:-outputs}"
PY=.venv/bin/python
STEPS="${MROVSEG_DEMO_STEPS:-600}"

echo "== 1/6 synthetic dataset (512 x 512 scenes, objects smaller than a global-view patch)"
$PY -m processing.synthetic --out "$OUT/synthetic" --num-train 48 --num-val 8 --height 512 --width 512
echo "== 2/6 tiny random CLIP (stands in for openai/clip-vit-base-patch16 offline)"
$PY -c "from processing.tiny_clip import build_tiny_clip; build_tiny_clip('$OUT/tiny-clip')"
echo "== 3/6 training with accelerate ($STEPS steps)"
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m training.train --model "$OUT/tiny-clip" --dataset "$OUT/synthetic" --output_dir "$OUT/run" \
  --max_steps "$STEPS" --batch_size 4 --crop_size 256 --eval_size 512 --lr 1e-3 --max_grad_norm 1.0 \
  --checkpointing_steps 200 --log_steps 50 --resume_from_checkpoint latest \
  --config '{"num_queries": 16, "hidden_dim": 64, "num_decoder_heads": 4, "decoder_ffn_dim": 128, "train_num_points": 2048}'
echo "== 4/6 evaluation on the validation split"
$PY -m training.evaluate --model "$OUT/run/model" --dataset "$OUT/synthetic" --split validation --eval_size 512 \
  --output "$OUT/run/eval_synthetic.json"
echo "== 5/6 model card"
$PY -m hub_cards.card --checkpoint "$OUT/run/model" --results "$OUT/run/eval_synthetic.json" \
  --repo-id your-name/mrovseg-tiny-synthetic
echo "== 6/6 segment a new sample"
$PY -c "
from PIL import Image
from processing.synthetic import make_scene
Image.fromarray(make_scene(512, 512, seed=12345)[0]).save('$OUT/sample.png')"
.venv/bin/mrovseg segment "$OUT/sample.png" --model "$OUT/run/model" --labels "grass,road,building,car,sign" \
  --out "$OUT/segmented"
echo "done: $OUT/run/model (checkpoint + README.md card), $OUT/segmented/sample_overlay.png"
