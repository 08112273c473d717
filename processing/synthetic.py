"""Synthetic high-resolution scenes with named classes at several sizes, for offline training and tests.

Every scene has a textured background ("grass"), a large band ("road"), medium blobs ("building") and small
objects ("car", "sign") that can be smaller than one CLIP patch of the downsampled global view: exactly the
objects a single-resolution model loses. Run `python -m processing.synthetic --out DIR` to write parquet that
`datasets.load_dataset("parquet", data_dir=DIR)` (or `load_from_parquet`) reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CLASS_NAMES = ["grass", "road", "building", "car", "sign"]
SMALL_CLASSES = ["car", "sign"]
MIN_SIDE = 32  # pixels: room for the road band, the buildings and the small objects
_COLORS = {"grass": (70, 140, 60), "road": (90, 90, 95), "building": (180, 150, 120), "car": (220, 30, 30),
           "sign": (30, 60, 230)}


def make_scene(height: int = 1024, width: int = 1024, seed: int = 0, small_size: int = 12,
               num_small: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 label map (ids index `CLASS_NAMES`)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((height, width), dtype=np.uint8)
    # road: a horizontal band of random height and position
    band = max(4, int(height * rng.uniform(0.15, 0.3)))
    top = int(rng.integers(0, height - band))
    label[top : top + band] = 1
    # buildings: a few large rectangles
    for _ in range(int(rng.integers(1, 4))):
        h, w = int(height * rng.uniform(0.1, 0.25)), int(width * rng.uniform(0.1, 0.25))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        label[y : y + h, x : x + w] = 2
    # small objects: squares of `small_size` pixels
    for i in range(num_small):
        size = max(2, int(small_size * rng.uniform(0.8, 1.2)))
        y, x = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
        label[y : y + size, x : x + size] = 3 + (i % 2)
    palette = np.array([_COLORS[name] for name in CLASS_NAMES], dtype=np.float32)
    image = palette[label]
    texture = rng.normal(0, 12, (height, width, 1)) + 8 * np.sin(np.arange(width)[None, :, None] / 3.0)
    image = np.clip(image + texture, 0, 255).astype(np.uint8)
    return image, label


def write_parquet(out: str | Path, num_train: int, num_val: int, height: int, width: int, seed: int = 0) -> Path:
    """Write train/validation parquet files (`image` as PNG bytes, `label` as PNG bytes) and class_names.json."""
    import datasets

    from .convert import check_same_dataset, encode_png

    out = Path(out)
    check_same_dataset(out, CLASS_NAMES, "give a new folder for the synthetic one")  # its splits would go
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})

    for split, count, offset in (("train", num_train, 0), ("validation", num_val, 10_000)):
        rows = {"image": [], "label": []}
        for i in range(count):
            image, label = make_scene(height, width, seed=seed + offset + i)
            rows["image"].append(encode_png(image))
            rows["label"].append(encode_png(label))
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out / f"{split}.parquet"))
    (out / "class_names.json").write_text(json.dumps(CLASS_NAMES))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # a split without rows is refused by training; a scene narrower than MIN_SIDE has no room for its objects (numpy
    # said "high <= 0" from deep inside make_scene)
    for name, low in (("num_train", 1), ("num_val", 1), ("height", MIN_SIDE), ("width", MIN_SIDE), ("seed", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    try:
        path = write_parquet(args.out, args.num_train, args.num_val, args.height, args.width, args.seed)
    except FileExistsError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.num_train} train / {args.num_val} validation scenes of {args.height}x{args.width} to {path}")


if __name__ == "__main__":
    main()
