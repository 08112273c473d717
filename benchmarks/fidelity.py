"""Fidelity of the three mechanisms on the synthetic high-resolution set, at equal training budget.

    python -m benchmarks.fidelity [--steps 600]

Trains the full model and three ablations (single resolution: no slices; no scale attention: the two
resolutions averaged; no local mask: high-resolution tokens read without the predicted attention mask) with the
same data, seed and steps, evaluates each on the validation split and writes the table to benchmarks/RESULTS.md.
Small-object IoU is the mean IoU of "car" and "sign", squares of about 12 px: 1.5 px in the 64 px global view.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

VARIANTS = {
    "full MROVSeg": {},
    "single resolution (global view only)": {"use_high_res": False},
    "no scale attention": {"use_scale_attention": False},
    "no local mask": {"use_local_mask": False},
}
BASE = {"num_queries": 16, "hidden_dim": 64, "num_decoder_heads": 4, "decoder_ffn_dim": 128, "train_num_points": 2048}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from accelerate.state import AcceleratorState

    from benchmarks.results_file import machine, write_section
    from processing.tiny_clip import build_tiny_clip
    from processing.synthetic import SMALL_CLASSES, write_parquet
    from training import evaluate as evaluate_script
    from training import train

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mrovseg-fidelity-"))
    data = write_parquet(work / "synthetic", num_train=48, num_val=8, height=512, width=512, seed=args.seed)
    clip = build_tiny_clip(work / "tiny-clip")
    rows = {}
    for name, overrides in VARIANTS.items():
        AcceleratorState._reset_state(reset_partial_state=True)
        out = work / name.split(" (")[0].replace(" ", "-")
        train.main(["--model", str(clip), "--dataset", str(data), "--output_dir", str(out), "--max_steps",
                    str(args.steps), "--batch_size", "4", "--crop_size", "256", "--eval_size", "512", "--lr", "1e-3",
                    "--max_grad_norm", "1.0", "--checkpointing_steps", str(args.steps), "--log_steps", "50",
                    "--seed", str(args.seed), "--config", json.dumps({**BASE, **overrides}), "--no_progress"])
        AcceleratorState._reset_state(reset_partial_state=True)
        result = evaluate_script.main(["--model", str(out / "model"), "--dataset", str(data), "--eval_size", "512",
                                       "--no_progress"])
        small = [result["per_class_iou"][c] for c in SMALL_CLASSES]
        rows[name] = {"mean_iou": result["mean_iou"], "small_object_iou": sum(small) / len(small),
                      "per_class_iou": result["per_class_iou"]}
        print(name, rows[name], flush=True)
    lines = [
        "## Fidelity: the three mechanisms on synthetic high-resolution scenes",
        "",
        f"`python -m benchmarks.fidelity --steps {args.steps}` on {machine()}. Tiny random CLIP (64 px input, 8 px "
        f"patches), 48 training / 8 validation scenes of 512 x 512, {args.steps} steps of batch 4 (256 px crops), "
        "same seed and data for every row; evaluated at full resolution (shortest edge 512).",
        "",
        "| variant | mIoU | small-object IoU (car, sign) |",
        "|---|---|---|",
        *[f"| {name} | {100 * r['mean_iou']:.1f} | {100 * r['small_object_iou']:.1f} |" for name, r in rows.items()],
        "",
        "One run per row. Float-level details alone (another seed, another order of summing gradients) move a run "
        "of this size by a few points of mIoU and more on the small classes (the main job's spread over seeds is in "
        "the performance section's loss paragraph), so only gaps well beyond that tell the mechanisms apart.",
    ]
    write_section("fidelity", "\n".join(lines))
    (work / "fidelity.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
