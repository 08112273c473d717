"""Merge a LoRA adapter saved by training/train.py into a plain MROVSeg checkpoint (no peft needed to load it).

    python -m training.merge_lora --adapter runs/x/adapter --out runs/x/merged [--base CLIP_OR_CHECKPOINT]

The base model is rebuilt from `adapter/mrovseg_base.json` (the CLIP or MROVSeg checkpoint, config overrides
and class names the run started from) unless `--base` names another copy of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default=None)
    args = parser.parse_args(argv)
    from training.lora import load_lora, merge_lora
    from training.train import build_model

    adapter = Path(args.adapter)
    recipe = json.loads((adapter / "mrovseg_base.json").read_text())
    base, tokenizer = build_model(args.base or recipe["model"], recipe["config"], recipe["class_names"])
    merged = merge_lora(load_lora(base, str(adapter)))
    out = Path(args.out)
    merged.save_pretrained(out, tokenizer=tokenizer)
    print(f"merged {adapter} into {out}")
    return out


if __name__ == "__main__":
    main()
