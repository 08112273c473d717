"""Merge a LoRA adapter saved by training/train.py into a plain MROVSeg checkpoint (no peft needed to load it).

    python -m training.merge_lora --adapter runs/x/adapter --out runs/x/merged [--base CLIP_OR_CHECKPOINT]

The base model is rebuilt from `adapter/mrovseg_base.json` (the CLIP or MROVSeg checkpoint, config overrides
and class names the run started from) unless `--base` names another copy of it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=os.path.expanduser, required=True)
    parser.add_argument("--out", required=True, type=os.path.expanduser)
    parser.add_argument("--base", type=os.path.expanduser, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    args = parser.parse_args(argv)
    from modeling_mrovseg.modeling_mrovseg import ADAPTER_RECIPE
    from training.data import loading
    from training.lora import load_lora, merge_lora
    from training.train import build_model

    adapter, out = Path(args.adapter), Path(args.out)
    if not (adapter / ADAPTER_RECIPE).is_file():
        parser.error(f"--adapter {adapter} is not an adapter folder saved by training.train (no {ADAPTER_RECIPE})")
    recipe = json.loads((adapter / ADAPTER_RECIPE).read_text())
    base_source = args.base or recipe["model"]
    if args.base is None and Path(base_source).is_absolute() and not Path(base_source).exists():
        # a run folder moved or copied to another machine: its recorded local base is not there
        parser.error(f"the adapter's base model {base_source} (recorded in {adapter / ADAPTER_RECIPE}) is not there; "
                     "give its new place with --base")
    # the merged files never land on the adapter or the base they are made from, nor unasked on anything else
    if out.exists() and out.resolve() in {adapter.resolve(), Path(base_source).expanduser().resolve()}:
        parser.error(f"--out {out} is the adapter or the base model itself; give a new folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        parser.error(f"--out {out} exists and is not empty; give a new folder, or --overwrite to replace its files")
    with loading("--base", base_source):
        base, tokenizer = build_model(base_source, recipe["config"], recipe["class_names"])
    merged = merge_lora(load_lora(base, str(adapter)))
    merged.save_pretrained(out, tokenizer=tokenizer)
    print(f"merged {adapter} into {out}")
    return out


if __name__ == "__main__":
    main()
