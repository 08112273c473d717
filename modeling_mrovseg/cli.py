"""`mrovseg segment IMAGE_OR_FOLDER --model PATH_OR_ID --labels "sky,road,car" --out DIR`.

Per image it writes `<name>_labels.png` (palette PNG of class indices), `<name>_overlay.png` (colours over the
photo with a legend) and `<name>.json` (labels, per-class pixel share and score). Files that cannot be read are
reported and skipped; the exit code is 1 when any image failed, 2 for unusable arguments.
Labels are comma-separated; to give synonyms, separate classes with ";" instead ("sofa, couch; lamp; floor").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def parse_labels(text: str) -> list[str]:
    from .text_classifier import validate_labels

    separator = ";" if ";" in text else ","
    return validate_labels([part.strip() for part in text.split(separator) if part.strip()])


def collect_images(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if source.is_file():
        return [source]
    raise FileNotFoundError(f"{source} does not exist")


def load_pipeline(model: str, device: str | None, resolution: int | None, slice_batch_size: int | None):
    from transformers import pipeline

    from . import register_pipelines

    register_pipelines()
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") != 1
    if looks_local and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"model folder {model!r} not found (give a checkpoint folder or a Hub id ORG/NAME)")
    segmenter = pipeline("zero-shot-image-segmentation", model=str(Path(model).expanduser()) if looks_local else model,
                         device=device)
    if resolution is not None:
        segmenter.image_processor.size = {"shortest_edge": resolution, "longest_edge": max(resolution, 4 * resolution)}
    if slice_batch_size is not None:
        segmenter.model.config.slice_batch_size = slice_batch_size
    return segmenter


def segment_command(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    from .visualization import colorize, draw_segmentation

    try:
        labels = parse_labels(args.labels)
        images = collect_images(Path(args.source))
        segmenter = load_pipeline(args.model, args.device, args.resolution, args.slice_batch_size)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not images:
        print(f"error: no images found in {args.source}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for path in tqdm(images, desc="segmenting", unit="image", disable=len(images) < 2 or args.quiet):
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
            result = segmenter(image, candidate_labels=labels, score_threshold=args.score_threshold)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            failed.append(path)
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        label_map = result["label_map"]
        stem = path.stem if len(images) == 1 else str(path.relative_to(args.source).with_suffix("")).replace("/", "__")
        colorize(label_map, len(labels)).save(out / f"{stem}_labels.png")
        draw_segmentation(image, label_map, labels).save(out / f"{stem}_overlay.png")
        total = label_map.size
        summary = {
            "image": str(path),
            "labels": labels,
            "classes": {s["label"]: {"pixel_share": s["pixels"] / total, "score": s["score"]} for s in result["segments"]},
            "unlabelled_share": float((label_map < 0).sum() / total),
        }
        (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    done = len(images) - len(failed)
    print(f"segmented {done} of {len(images)} images into {out}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mrovseg", description="MROVSeg open-vocabulary segmentation")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment an image or a folder of images",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    segment.add_argument("source", help="an image file or a folder (searched recursively)")
    segment.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    segment.add_argument("--labels", required=True, help='class names, e.g. "sky,road,car" or "sofa, couch; lamp"')
    segment.add_argument("--out", required=True, help="output folder")
    segment.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    segment.add_argument("--resolution", type=int, default=None, help="shortest edge the image is resized to")
    segment.add_argument("--slice-batch-size", type=int, default=None, help="slices per CLIP call (memory bound)")
    segment.add_argument("--score-threshold", type=float, default=None,
                         help="leave pixels whose best class score is below this unlabelled")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return segment_command(args)


if __name__ == "__main__":
    sys.exit(main())
