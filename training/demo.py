"""Offline end-to-end demo: tiny random CLIP -> MROVSeg -> a short fit on a synthetic scene -> segment a new one.

Until the full training entry point lands this is the README's main job: it needs no download and runs in about
a minute on 2 CPU cores. Outputs: the checkpoint (safetensors, remote code), a palette label map, an overlay
picture with a legend, and a JSON of per-class IoU and pixel shares.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transformers import AutoTokenizer

from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegImageProcessor, MROVSegProcessor
from modeling_mrovseg.tiny import build_tiny_clip
from modeling_mrovseg.visualization import colorize, draw_segmentation
from processing.synthetic import CLASS_NAMES, make_scene


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    clip_dir = build_tiny_clip(out / "tiny-clip")
    model = MROVSegForOpenVocabSegmentation.from_clip(
        str(clip_dir), vocabulary=CLASS_NAMES, num_queries=10, hidden_dim=32, num_decoder_heads=4,
        decoder_ffn_dim=64, train_num_points=2048, slice_batch_size=8)
    model.print_trainable_parameters()
    processor = MROVSegImageProcessor(slice_size=model.config.slice_size, size={"height": 256, "width": 512})

    image, label = make_scene(256, 512, seed=3, small_size=10, num_small=16)
    inputs = processor(image, segmentation_maps=label, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    start = time.time()
    model.train()
    for step in range(args.steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)

    model.eval()
    model.save_pretrained(out / "checkpoint")
    MROVSegProcessor(processor, AutoTokenizer.from_pretrained(clip_dir),
                     prompt_templates=model.config.prompt_templates).save_pretrained(out / "checkpoint")
    Image.fromarray(make_scene(256, 512, seed=11, small_size=10, num_small=16)[0]).save(out / "sample.png")
    with torch.inference_mode():
        outputs = model(**inputs)
    prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[label.shape])[0].numpy()
    ious = {}
    for c, name in enumerate(CLASS_NAMES):
        union = ((prediction == c) | (label == c)).sum()
        ious[name] = float(((prediction == c) & (label == c)).sum() / union) if union else float("nan")
    shares = {name: float((prediction == c).mean()) for c, name in enumerate(CLASS_NAMES)}
    colorize(prediction, len(CLASS_NAMES)).save(out / "label_map.png")
    draw_segmentation(Image.fromarray(image), prediction, CLASS_NAMES).save(out / "overlay.png")
    results = {"iou": ious, "mean_iou": float(np.nanmean(list(ious.values()))), "pixel_share": shares}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {out / 'overlay.png'}, {out / 'label_map.png'}, {out / 'results.json'} and {out / 'checkpoint'}")
    print(f"try: mrovseg segment {out / 'sample.png'} --model {out / 'checkpoint'} --labels "
          f"\"{','.join(CLASS_NAMES)}\" --out {out / 'segmented'}")
    return results


if __name__ == "__main__":
    main()
