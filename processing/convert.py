"""Convert segmentation datasets into the one schema training and evaluation read.

Output: OUT/<split>.parquet with columns `image` and `label` (PNG images; label values are contiguous class
indices, 255 = unlabelled; past 255 classes, as ADE20K-847 and Pascal Context-459, 16-bit PNGs with 65535 unlabelled)
and OUT/class_names.json. One sub-command per source format:

    python -m processing.convert coco-stuff   --source DIR_OR_HUB_ID --out data/coco-stuff     # parquet: image, mask
    python -m processing.convert ade20k-150   --source DIR_OR_HUB_ID --out data/ade150         # parquet: image, annotation
    python -m processing.convert ade20k-847   --source ADE20K_2021_17_01 --class-list ade847.tsv --out data/ade847
    python -m processing.convert pascal-context --source VOCdevkit/VOC2010 --variant 59|459 --out data/pc59
    python -m processing.convert pascal-voc   --source VOCdevkit/VOC2012 --variant 20|21 --out data/voc20
    python -m processing.convert folder       --source my_data --class-names "background,crack,rust" --out data/mine
    python -m processing.convert coco         --source my_export --background background --out data/mine

`folder` reads your own data: my_data/images/<name>.<jpg|png> with my_data/labels/<name>.png (pixel value = class
index, 255 = unlabelled; `--binary-masks` for 0/255 masks of two classes; `--label-colors` for colour-coded masks,
and a CVAT "Segmentation mask" export, JPEGImages/ + SegmentationClass/ + labelmap.txt, reads as it is); a seeded
`--val-fraction` of the images becomes the validation split. A Roboflow "Semantic Segmentation Masks" export (train/,
valid/, test/ with <stem>_mask.png beside each image and a _classes.csv) converts with its own splits and names.
`coco` reads COCO instance annotations (polygons or RLE), as CVAT ("COCO 1.0"), Roboflow ("COCO Segmentation"),
Label Studio and most labelling tools export them: each pixel gets the category of the annotation on top (smaller
regions over larger ones), categories in id order; `--background NAME` labels the pixels no annotation covers.

Images are stored as everyone shows them: a photo's EXIF orientation applies (JPEG bytes are kept with their EXIF,
which `datasets` applies when decoding; other formats are stored rotated), 16-bit images are scaled and transparency
is composited onto white, as the image processor reads them at inference. A `folder` label is taken as drawn over the
image as shown; one that fits only the stored, unrotated pixels (a 90-degree EXIF rotation, a non-square photo) is
turned with its image, and the run says how many labels it turned.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from modeling_mrovseg.cli import IMAGE_SUFFIXES, files_below, one_line
from modeling_mrovseg.configuration_mrovseg import unlabelled_value
from modeling_mrovseg.image_processing_mrovseg import to_rgb_uint8
from modeling_mrovseg.pipelines import heif_support, unread_format_hint
from modeling_mrovseg.text_classifier import parse_class_names
from training.data import grey_channel, load_local_split

from .class_names import (
    ADE20K_150,
    COCO_STUFF_171,
    COCO_STUFF_UNUSED_IDS,
    PASCAL_CONTEXT_59,
    PASCAL_VOC_20,
    PASCAL_VOC_21,
)


def lookup_table(mapping: dict[int, int], size: int = 65536) -> np.ndarray:
    """Raw value -> contiguous id; everything unmapped -> the unlabelled value of that many classes (255, or 65535
    past 255 classes, where 255 is a class: `unlabelled_value`)."""
    table = np.full(size, unlabelled_value(max(mapping.values(), default=-1) + 1), dtype=np.uint16)
    for raw, new in mapping.items():
        table[raw] = new
    return table


def coco_stuff_table() -> np.ndarray:
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    assert len(used) == len(COCO_STUFF_171)
    return lookup_table({raw: new for new, raw in enumerate(used)})


def reduce_labels_table(num_classes: int) -> np.ndarray:
    """0 (other / background) -> 255, k -> k - 1."""
    return lookup_table({k: k - 1 for k in range(1, num_classes + 1)})


def encode_png(array_or_image) -> dict:
    """An image or uint8 array as the `datasets.Image` cell of lossless PNG bytes."""
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


OWNER_FILE = ".owner-pid"


def remove_abandoned_staging(out: Path) -> None:
    """Scratch folders of conversions into `out` that were killed (kill -9, power loss: no `finally` ran) held a
    whole dataset's parquet files, hidden beside `out` for good; those whose process is gone are removed."""
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int((staging / OWNER_FILE).read_text())
        except (OSError, ValueError):  # no owner written: a run from before owners were written, or one just starting
            pid = None
            if time.time() - staging.stat().st_mtime < 60:
                continue
        if pid is not None and pid != os.getpid() and process_alive(pid):
            continue  # another conversion into the same folder, still running
        shutil.rmtree(staging, ignore_errors=True)
        print(f"removed {staging}, left by an interrupted conversion", file=sys.stderr)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """
    A scratch folder beside `out` that replaces `out`'s files only if the whole conversion succeeds.

    A conversion that fails half-way leaves `out` as it was (never an old train split next to a new validation split);
    files of `out` that this run does not write are kept. A folder holding another dataset (other class names) is
    not replaced unless `overwrite`: a mistyped --out must not cost an earlier conversion.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (staging / OWNER_FILE).write_text(str(os.getpid()))
    try:
        yield staging
        if not overwrite:
            check_same_dataset(out, json.loads((staging / "class_names.json").read_text()))
        out.mkdir(parents=True, exist_ok=True)
        written = [path for path in staging.iterdir() if path.name != OWNER_FILE]
        for path in sorted(written, key=lambda p: p.name == "class_names.json"):  # class names last
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_same_dataset(out: Path, class_names: list[str],
                       remedy: str = "give a new --out, or --overwrite to replace it") -> None:
    """`out` is new, or holds a dataset with these class names (a re-conversion); anything else is refused."""
    stored = out / "class_names.json"
    if stored.is_file():
        before = json.loads(stored.read_text())
        if before != class_names:
            raise FileExistsError(f"{out} holds another dataset ({len(before)} classes: {', '.join(before[:4])}"
                                  f"{', ...' if len(before) > 4 else ''}); {remedy}")
    elif out.is_dir() and any(out.glob("*.parquet")):
        raise FileExistsError(f"{out} holds another dataset (parquet files without class_names.json); {remedy}")


def _encoded(image: Image.Image) -> dict:
    """Keep JPEG sources as JPEG bytes (no re-encoding loss, smaller files; `datasets` applies their EXIF orientation
    when decoding); anything else as the RGB PNG the image processor would read (orientation, 16-bit, alpha)."""
    if image.format == "JPEG" and getattr(image, "filename", None):
        return {"bytes": Path(image.filename).read_bytes(), "path": None}
    return encode_png(to_rgb_uint8(image))


# EXIF orientation -> the PIL transpose that shows the image upright (2..4 keep the size, 5..8 swap it)
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright, also when absent or unknown)."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in ORIENTATIONS else 1


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as shown (and as `datasets` and the image processor decode it)."""
    swapped = exif_orientation(image) >= 5
    return (image.width, image.height) if swapped else (image.height, image.width)


NO_VALIDATION_NOTE = ("note: no validation split (--val-fraction gives none of these images): train with --eval_split "
                      "none, or --eval_split train to score the training images")


def note_absent_classes(class_names: list[str], seen: set[int]) -> None:
    absent = [name for index, name in enumerate(class_names) if index not in seen]
    if absent:
        print(f"note: {len(absent)} class(es) appear in no label: {', '.join(absent[:10])}", file=sys.stderr)


def validation_split(items: list, val_fraction: float, seed: int) -> dict[str, list]:
    """A seeded `val_fraction` of `items` as the validation split, the rest as train (one item: no validation)."""
    order = np.random.default_rng(seed).permutation(len(items))
    num_val = int(round(len(items) * val_fraction)) if len(items) > 1 else 0
    return {"validation": [items[i] for i in order[:num_val]], "train": [items[i] for i in order[num_val:]]}


def as_shown(label: np.ndarray, image: Image.Image) -> tuple[np.ndarray, bool]:
    """A label drawn over the stored pixels of a photo with an EXIF rotation (it fits only those) turned as the photo
    is shown, and whether it was."""
    if label.shape != shown_size(image) and label.shape == (image.height, image.width):
        transpose = ORIENTATIONS[exif_orientation(image)]
        return np.asarray(Image.fromarray(label.astype(np.int32)).transpose(transpose), dtype=np.int64), True
    return label, False


def stray_label_values(values: np.ndarray, num_classes: int) -> np.ndarray:
    """The label values that are neither a class id nor the unlabelled value of `num_classes` classes."""
    return np.setdiff1d(values, [*range(num_classes), unlabelled_value(num_classes)])


def write_split(out: Path, split: str, rows: Callable[[], Iterator[tuple[Image.Image, np.ndarray]]],
                class_names: list[str]) -> Path:
    """Stream (image, contiguous label array) pairs into OUT/<split>.parquet and write class_names.json. Labels are
    8-bit PNGs (255 unlabelled), or 16-bit ones past 255 classes (65535 unlabelled: `unlabelled_value`)."""
    import datasets

    unlabelled = unlabelled_value(len(class_names))
    dtype = np.uint8 if unlabelled == 255 else np.uint16

    def generate():
        for row, (image, label) in enumerate(rows()):
            where = getattr(image, "filename", None) or f"row {row} of the {split} split"  # which one to fix
            if shown_size(image) != label.shape:
                raise ValueError(f"{where}: image {shown_size(image)} and label {label.shape} differ in size")
            stray = stray_label_values(np.unique(label), len(class_names))
            if stray.size:  # never stored: an 8-bit map would wrap class 300 to 44
                raise ValueError(f"{where}: the label holds {stray[:5].tolist()}, neither one of the "
                                 f"{len(class_names)} classes nor the unlabelled value {unlabelled}")
            yield {"image": _encoded(image), "label": encode_png(label.astype(dtype))}

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    out.mkdir(parents=True, exist_ok=True)
    # a throw-away cache: from_generator would otherwise reuse a stale conversion of files changed on disk
    with tempfile.TemporaryDirectory() as cache:
        try:
            dataset = datasets.Dataset.from_generator(generate, features=features, cache_dir=cache)
        except datasets.exceptions.DatasetGenerationError as error:  # surface our own message, not the wrapper's
            cause = error.__cause__ or error.__context__
            raise (cause if isinstance(cause, (ValueError, OSError)) else error) from None
        dataset.to_parquet(str(out / f"{split}.parquet"))
    (out / "class_names.json").write_text(json.dumps(class_names, indent=1))
    return out / f"{split}.parquet"


# ---------------------------------------------------------------- parquet sources (Hub copies)
def _load_table_dataset(source: str, split: str):
    import datasets

    path = Path(source)
    if path.exists():  # the same local layouts training reads
        return load_local_split(path, split)
    return datasets.load_dataset(source, split=split)


def _column(dataset, candidates: tuple[str, ...]) -> str:
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(f"none of the columns {candidates} in {dataset.column_names}")


def convert_table(source: str, out: Path, split: str, table: np.ndarray, class_names: list[str],
                  label_columns: tuple[str, ...], expected: Sequence[int]) -> Path:
    """Masks of raw ids -> contiguous ids through `table`; a raw value outside `expected` (the source format's ids,
    its unlabelled value included) is an error, not one more unlabelled pixel: it means another format (masks already
    in contiguous ids, say), whose every class would shift."""
    dataset = _load_table_dataset(source, split)
    label_column = _column(dataset, label_columns)
    known = np.zeros(len(table), dtype=bool)
    known[list(expected)] = True

    def rows():
        for index, example in enumerate(dataset):
            image = example["image"]
            raw = np.asarray(example[label_column]).astype(np.int64)
            if raw.ndim == 3:
                raw = raw[..., 0]
            values = np.unique(raw)
            unknown = values[(values < 0) | (values >= len(table)) | ~known[np.clip(values, 0, len(table) - 1)]]
            if unknown.size:
                raise ValueError(f"row {index} of {source} ({split}) holds mask values {unknown[:6].tolist()}, which "
                                 "are no ids of this source format; are its masks in another id scheme (already "
                                 f"contiguous 0..{len(class_names) - 1})?")
            yield image, table[raw]

    return write_split(out, split, rows, class_names)


def convert_coco_stuff(source: str, out: Path, split: str) -> Path:
    """COCO-Stuff-164k parquet (image, mask with raw ids 0-181, 255 unlabelled) -> 171 contiguous classes."""
    raw_ids = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS] + [255]
    return convert_table(source, out, split, coco_stuff_table(), COCO_STUFF_171, ("mask", "label", "annotation"),
                         raw_ids)


def convert_ade20k_150(source: str, out: Path, split: str) -> Path:
    """ADE20K SceneParsing parquet (image, annotation: 0 = other, 1-150 classes) -> 150 classes."""
    return convert_table(source, out, split, reduce_labels_table(150), ADE20K_150,
                         ("annotation", "label", "mask", "segmentation"), range(151))


# ---------------------------------------------------------------- raw-file sources
def read_class_list(path: str | Path) -> tuple[list[int], list[str]]:
    """`raw_index<TAB>name` lines (or "raw_index: name") -> (raw indices, names) in file order."""
    indices, names = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        raw, name = (line.split("\t", 1) if "\t" in line else line.split(":", 1))
        indices.append(int(raw))
        names.append(name.strip())
    return indices, names


def convert_ade20k_847(source: str, out: Path, split: str, class_list: str) -> Path:
    """
    The full ADE20K release: images/ADE/<split>/**/ADE_*.jpg with *_seg.png, whose object class is
    R / 10 * 256 + G. `class_list` gives the 847 benchmark classes as raw class index and name (the
    benchmark's published list); other classes are unlabelled.
    """
    raw_indices, names = read_class_list(class_list)
    table = lookup_table({raw: new for new, raw in enumerate(raw_indices)})
    folder = "training" if split == "train" else "validation"
    images = sorted((Path(source) / "images" / "ADE" / folder).rglob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no images under {Path(source) / 'images' / 'ADE' / folder}")

    def rows():
        for path in images:
            seg = np.asarray(Image.open(path.with_name(path.stem + "_seg.png")).convert("RGB"), dtype=np.int64)
            yield Image.open(path), table[seg[..., 0] // 10 * 256 + seg[..., 1]]

    return write_split(out, split, rows, names)


def convert_pascal_context(source: str, out: Path, split: str, variant: int) -> Path:
    """
    Pascal Context on VOC2010: JPEGImages/, trainval/<id>.mat (LabelMap, 459 classes, 0 = unlabelled),
    labels.txt ("id: name") and the split list <split>.txt (or ImageSets/Segmentation/<split>.txt).
    PC-459 keeps every class; PC-59 keeps the 59 frequent ones (by name) and ignores the rest.
    """
    from scipy.io import loadmat

    root = Path(source)
    raw_indices, raw_names = read_class_list(root / "labels.txt")
    if variant == 459:
        names = raw_names
        table = lookup_table({raw: new for new, raw in enumerate(raw_indices)})
    elif variant == 59:
        names = PASCAL_CONTEXT_59
        by_name = dict(zip(raw_names, raw_indices))
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"labels.txt lacks the Pascal Context 59 classes {missing}")
        table = lookup_table({by_name[name]: new for new, name in enumerate(names)})
    else:
        raise ValueError("variant must be 59 or 459")
    ids = _split_ids(root, split)

    def rows():
        for image_id in ids:
            label = loadmat(str(root / "trainval" / f"{image_id}.mat"))["LabelMap"].astype(np.int64)
            yield Image.open(root / "JPEGImages" / f"{image_id}.jpg"), table[label]

    return write_split(out, split, rows, names)


def convert_pascal_voc(source: str, out: Path, split: str, variant: int) -> Path:
    """VOC2012: JPEGImages/, SegmentationClass/<id>.png (0 background, 1-20, 255 boundary), ImageSets lists."""
    root = Path(source)
    if variant == 21:
        table, names = lookup_table({k: k for k in range(21)}), PASCAL_VOC_21
    elif variant == 20:
        table, names = reduce_labels_table(20), PASCAL_VOC_20
    else:
        raise ValueError("variant must be 20 or 21")
    ids = _split_ids(root, split)

    def rows():
        for image_id in ids:
            label = np.asarray(Image.open(root / "SegmentationClass" / f"{image_id}.png"), dtype=np.int64)
            yield Image.open(root / "JPEGImages" / f"{image_id}.jpg"), table[label]

    return write_split(out, split, rows, names)


# Roboflow's "Semantic Segmentation Masks" export: one folder per split, each image beside its <stem>_mask.png (class
# ids) and a _classes.csv ("Pixel Value, Class")
ROBOFLOW_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def roboflow_class_names(root: Path) -> list[str] | None:
    """The class names of a Roboflow export (its splits' _classes.csv, which must agree), or None for another layout."""
    tables = [root / folder / "_classes.csv" for folder in ROBOFLOW_SPLITS]
    tables = [table for table in tables if table.is_file()]
    if not tables:
        return None
    found = []
    for table in tables:
        rows = [line.split(",", 1) for line in table.read_text(encoding="utf-8-sig").splitlines()[1:] if line.strip()]
        try:
            by_value = {int(value): name.strip() for value, name in rows}
        except ValueError:
            raise ValueError(f"{table} is not a 'Pixel Value, Class' table") from None
        if sorted(by_value) != list(range(len(by_value))):
            raise ValueError(f"{table} numbers its classes {sorted(by_value)[:8]}, not 0..{len(by_value) - 1}")
        found.append([by_value[i] for i in range(len(by_value))])
    if any(names != found[0] for names in found):
        raise ValueError(f"the _classes.csv of {root}'s splits name different classes")
    return found[0]


def convert_roboflow(root: Path, out: Path, class_names: list[str]) -> list[Path]:
    """A Roboflow export's splits (train, valid -> validation, test) as they are: each image with its _mask.png."""
    written = []
    for folder, split in ROBOFLOW_SPLITS.items():
        masks = files_below(root / folder, {".png"}) if (root / folder).is_dir() else []
        masks = [mask for mask in masks if mask.stem.endswith("_mask")]
        if not masks:
            continue
        pairs = []
        for mask in masks:
            stem = mask.name[: -len("_mask.png")]
            image_path = next((p for p in mask.parent.glob(f"{glob.escape(stem)}.*")
                               if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES), None)
            if image_path is None:
                raise FileNotFoundError(f"{mask} has no image {stem}.<jpg|png> beside it")
            pairs.append((image_path, mask))

        def rows(pairs=pairs):
            for image_path, mask in pairs:
                yield Image.open(image_path), np.asarray(Image.open(mask), dtype=np.int64)

        written.append(write_split(out, split, rows, class_names))
    if not written:
        raise FileNotFoundError(f"{root} holds no <image>_mask.png in {', '.join(ROBOFLOW_SPLITS)}/")
    return written


# ---------------------------------------------------------------- COCO instance annotations (polygons, RLE)
def coco_annotation_files(root: Path, annotations: str | None) -> dict[str, Path]:
    """split -> COCO JSON: the file given (one split, divided by --val-fraction), a Roboflow "COCO Segmentation"
    export's splits (train/, valid/, test/, each with _annotations.coco.json beside its images), or the one JSON in
    annotations/ or in the folder itself (CVAT's "COCO 1.0": annotations/instances_default.json; Label Studio's
    result.json)."""
    if annotations is not None:
        path = Path(annotations).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--annotations {path} not found")
        return {"": path}
    splits = {split: root / folder / "_annotations.coco.json" for folder, split in ROBOFLOW_SPLITS.items()
              if (root / folder / "_annotations.coco.json").is_file()}
    if splits:
        return splits
    folder = root / "annotations" if (root / "annotations").is_dir() else root
    found = sorted(folder.glob("*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{'no' if not found else len(found)} JSON files in {folder}: give the COCO "
                                "annotation file with --annotations")
    return {"": found[0]}


def read_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise ValueError(f"{path} is no COCO annotation file (it needs images, annotations and categories)")
    for part, keys in (("images", ("id", "file_name", "height", "width")), ("annotations", ("image_id", "category_id")),
                       ("categories", ("id", "name"))):
        for entry in data[part]:
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ValueError(f"{path}: an entry of its {part} lacks {', '.join(missing)}: {str(entry)[:80]}")
    return data


def coco_categories(data: dict) -> list[dict]:
    """The categories a COCO file can label with, in id order: one that only names other categories' supercategory
    and labels nothing (Roboflow exports the project's name so, as id 0) is left out."""
    used = {annotation["category_id"] for annotation in data["annotations"]}
    parents = {category.get("supercategory") for category in data["categories"]}
    return [category for category in sorted(data["categories"], key=lambda c: c["id"])
            if category["id"] in used or category["name"] not in parents]


def coco_label(annotations: list[dict], height: int, width: int, class_of: dict[int, int], fill: int,
               where: str) -> np.ndarray:
    """One image's annotations (polygons, RLE, compressed or not) as a (height, width) map of class indices, `fill`
    where none lies; larger regions first, so an object drawn inside another (a sign on a wall) stays on top."""
    from pycocotools import mask as coco_mask

    masks = []
    for annotation in annotations:
        shape = annotation.get("segmentation")
        if isinstance(shape, list):  # polygons [x1, y1, x2, y2, ...]; fewer than 3 points enclose nothing
            polygons = [polygon for polygon in shape if len(polygon) >= 6]
            if not polygons:
                continue
            rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
        elif isinstance(shape, dict) and "counts" in shape:
            if list(shape.get("size", [])) != [height, width]:
                raise ValueError(f"{where}: an RLE mask of size {shape.get('size')} on an image of {height} x {width}")
            counts = shape["counts"]
            rle = (coco_mask.frPyObjects(shape, height, width) if isinstance(counts, list)
                   else {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts})
        else:  # a bounding box alone labels no pixel
            continue
        mask = coco_mask.decode(rle).astype(bool)
        masks.append((int(mask.sum()), class_of[annotation["category_id"]], mask))
    label = np.full((height, width), fill, dtype=np.int64)
    for _, class_index, mask in sorted(masks, key=lambda item: -item[0]):
        label[mask] = class_index
    return label


def convert_coco(source: str, out: Path, annotations: str | None = None, background: str | None = None,
                 val_fraction: float = 0.1, seed: int = 0) -> list[Path]:
    """COCO instance annotations (what CVAT, Roboflow, Label Studio and most labelling tools export) -> semantic
    label maps: each pixel the category of the annotation on top, the categories in id order as class names
    (after `background`, which then labels the pixels no annotation covers; unlabelled without it)."""
    import importlib.util

    if importlib.util.find_spec("pycocotools") is None:
        raise ValueError("COCO annotations are decoded with pycocotools: pip install pycocotools (or the `coco` "
                         "extra: pip install -e \".[coco]\")")
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} not found")
    files = coco_annotation_files(root, annotations)
    datas = {split: read_coco(path) for split, path in files.items()}
    categories = {split: coco_categories(data) for split, data in datas.items()}
    first_split, first = next(iter(categories.items()))
    for split, found in categories.items():
        if [c["name"] for c in found] != [c["name"] for c in first]:
            raise ValueError(f"the COCO files of {root} name different categories: {files[first_split]} and "
                             f"{files[split]}")
    names = [category["name"] for category in first]
    if not names:
        raise ValueError(f"{files[first_split]} has no categories")
    class_names = parse_class_names(([background] if background else []) + names)
    offset = 1 if background else 0
    fill = 0 if background else unlabelled_value(len(class_names))
    heif_support()

    def index(split: str) -> tuple[dict[int, int], dict[int, list[dict]]]:
        """Category id -> class index, and image id -> its annotations, of one annotation file."""
        class_of = {category["id"]: number + offset for number, category in enumerate(categories[split])}
        by_image: dict[int, list[dict]] = {}
        for annotation in datas[split]["annotations"]:
            if annotation["category_id"] not in class_of:
                raise ValueError(f"{files[split]}: an annotation of image {annotation.get('image_id')} names "
                                 f"category {annotation['category_id']}, which is not among its categories")
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        return class_of, by_image

    indexes = {split: index(split) for split in datas}

    def rows_of(split: str, images: list[dict]):
        folder = files[split].parent
        class_of, by_image = indexes[split]

        def image_path(entry: dict) -> Path:
            name = entry["file_name"]
            for base in (folder, root, root / "images", folder.parent / "images"):
                if (base / name).is_file():
                    return base / name
            raise FileNotFoundError(f"{files[split]} names the image {name}, found neither beside it nor in "
                                    f"{root} or {root / 'images'}")

        paths = {entry["id"]: image_path(entry) for entry in images}  # every file checked before the first row

        def rows():
            for entry in images:
                path, height, width = paths[entry["id"]], int(entry["height"]), int(entry["width"])
                label = coco_label(by_image.get(entry["id"], []), height, width, class_of, fill, str(path))
                seen.update(np.unique(label).tolist())
                image = Image.open(path)
                yield image, as_shown(label, image)[0]
        return rows

    written, seen = [], set()
    for split, data in datas.items():
        images = sorted(data["images"], key=lambda entry: entry["id"])
        if split:  # a Roboflow export's own splits
            written.append(write_split(out, split, rows_of(split, images), class_names))
            continue
        parts = {name: sorted(part, key=lambda entry: entry["id"])  # each split in id order
                 for name, part in validation_split(images, val_fraction, seed).items()}
        written += [write_split(out, name, rows_of("", part), class_names) for name, part in parts.items() if part]
        if not parts["validation"]:
            print(NO_VALIDATION_NOTE, file=sys.stderr)
    note_absent_classes(class_names, seen)
    if not background:
        print(f"note: pixels outside every annotation are unlabelled ({fill}), so nothing teaches the model what is "
              "none of these classes; --background NAME makes them a class", file=sys.stderr)
    return written


# class names in a colour map that mark pixels to leave unlabelled rather than a class (VOC's boundary "void")
UNLABELLED_NAMES = {"void", "ignore", "unlabelled", "unlabeled"}


def read_label_colors(spec: str) -> dict[tuple[int, int, int], str]:
    """Colour -> class name of colour-coded label PNGs, in class order: a `labelmap.txt` as CVAT's "Segmentation
    mask" export and VOC-style tools write it (`name:r,g,b:parts:actions` per line, `#` comments), or JSON (inline or
    a file) mapping names to [r, g, b]."""
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig") if path.is_file() else spec
    except OSError:  # inline JSON too long to be a file name
        text = spec
    if text.lstrip().startswith(("{", "[")):
        try:
            pairs = [(name, color) for name, color in json.loads(text).items()]
        except (ValueError, AttributeError) as error:
            raise ValueError(f"--label-colors {spec!r} is not a JSON object of name -> [r, g, b]: {error}") from None
    else:
        pairs = [(line.split(":")[0], line.split(":")[1].split(",") if ":" in line else [])
                 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    colors: dict[tuple[int, int, int], str] = {}
    for name, color in pairs:
        try:
            rgb = tuple(int(c) for c in color)
        except (TypeError, ValueError):
            rgb = ()
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"--label-colors {spec!r}: {name!r} has no r,g,b colour ({color!r})")
        if rgb in colors:
            raise ValueError(f"--label-colors {spec!r}: {colors[rgb]!r} and {name!r} share the colour {rgb}")
        colors[rgb] = name.strip()
    if not colors:
        raise ValueError(f"--label-colors {spec!r} names no colours")
    return colors


def color_classes(colors: dict[tuple[int, int, int], str]) -> list[str]:
    """The classes of a colour map in its order: a name given two colours is one class, void-like names none."""
    return list(dict.fromkeys(name for name in colors.values() if name.lower() not in UNLABELLED_NAMES))


def colors_to_ids(label: Image.Image, colors: dict[tuple[int, int, int], str], class_names: list[str],
                  where: Path) -> np.ndarray:
    """A colour-coded label image as class ids (colours named as unlabelled -> the unlabelled value); a colour the map
    lacks is an error naming it and its pixel count (a smoothed edge, another export's colours)."""
    rgb = np.asarray(label.convert("RGB"), dtype=np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    values, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    unlabelled = unlabelled_value(len(class_names))
    table, unknown = np.empty(len(values), dtype=np.int64), []
    for i, value in enumerate(values.tolist()):
        color = (value >> 16, (value >> 8) & 255, value & 255)
        name = colors.get(color)
        if name is None:
            unknown.append(f"{color} ({counts[i]} pixels)")
        else:
            table[i] = unlabelled if name.lower() in UNLABELLED_NAMES else class_names.index(name)
    if unknown:
        raise ValueError(f"{where} has colours that --label-colors does not name: {', '.join(unknown[:3])}"
                         f"{f' and {len(unknown) - 3} more' if len(unknown) > 3 else ''} (labels must be drawn "
                         "without smoothing, in the export's own colours)")
    return table[inverse.reshape(packed.shape)]


def name_ending(key: str) -> str:
    """The last part of a file name from its last "_" or "-" on ("_mask" of "day1/img0_mask"), or ""."""
    match = re.search(r"[_-][^_/-]*$", key)
    return match.group() if match else ""


def rename(key: str, image_ending: str, label_ending: str) -> str:
    return key[:len(key) - len(image_ending)] + label_ending


def renamed_pairing(image_keys: list[str], label_keys: set[str]) -> tuple[str, str] | None:
    """(image ending, label ending) under which every image finds its label, for folders whose names differ by
    one ending that most of them share: img0.jpg with img0_mask.png, 119_sat.jpg with 119_mask.png (DeepGlobe),
    a legend.png among the labels aside; None if no such renaming pairs them all."""
    def common_endings(keys) -> list[str]:  # at most two: each on at least half of the names
        counts = Counter(name_ending(k) for k in keys)
        return [ending for ending, n in counts.most_common(2) if ending and 2 * n >= len(keys)] + [""]

    for image_ending in common_endings(image_keys):
        for label_ending in common_endings(label_keys):
            if (image_ending or label_ending) and all(
                    k.endswith(image_ending) and rename(k, image_ending, label_ending) in label_keys
                    for k in image_keys):
                return image_ending, label_ending
    return None


def convert_folder(source: str, out: Path, class_names: list[str] | None, val_fraction: float = 0.1,
                   seed: int = 0, binary_masks: bool = False,
                   label_colors: dict[tuple[int, int, int], str] | None = None) -> list[Path]:
    """Images + label PNGs in two folders -> train/validation parquet (labels checked against the class count).

    Sub-folders are read too (images/b1/x.jpg with labels/b1/x.png), names that differ by one shared ending pair
    (`renamed_pairing`), a grey label saved as RGB reads as one channel; hidden files (`.DS_Store`, macOS `._photo.jpg`
    copies) are skipped. `binary_masks`: each label is a mask, 0 for
    class 0 and any other value (1, 255) for class 1 (two class names); otherwise 255 is unlabelled, so a folder of
    0/255 masks, which would train nothing but class 0, is an error that points to this option.

    `label_colors` (colour -> class name, `read_label_colors`): labels are colour-coded PNGs; the class names are the
    map's, in its order. A CVAT "Segmentation mask" (VOC-style) export reads as it is: JPEGImages/ and
    SegmentationClass/ stand for images/ and labels/, and its labelmap.txt gives the colours."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} not found")
    exported = roboflow_class_names(root)
    if exported is not None:  # its own splits, its own class names
        if class_names is not None and class_names != exported:
            raise ValueError(f"--class-names {class_names} differ from the export's _classes.csv {exported}; give one "
                             "of them")
        print(f"note: {root} is a Roboflow export: its own splits and _classes.csv are used (no --val-fraction)",
              file=sys.stderr)
        return convert_roboflow(root, out, exported)
    image_dir, label_dir = root / "images", root / "labels"
    if not image_dir.is_dir() and (root / "JPEGImages").is_dir():  # a CVAT / VOC-style export
        image_dir, label_dir = root / "JPEGImages", root / "SegmentationClass"
        if label_colors is None and (root / "labelmap.txt").is_file():
            label_colors = read_label_colors(str(root / "labelmap.txt"))
    if label_colors is not None:
        from_colors = color_classes(label_colors)
        if class_names is not None and class_names != from_colors:
            raise ValueError(f"--class-names {class_names} differ from the label colours' classes {from_colors}; "
                             "give one of them")
        if binary_masks:
            raise ValueError("--binary-masks and label colours exclude each other: colours name every class")
        class_names = from_colors
    if class_names is None:
        raise ValueError(f"no class names for {root}: give --class-names (or --label-colors for colour-coded labels)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{root} has no images/ folder: give a folder holding images/ and labels/ (a "
                                "<name>.png per image)")
    suffixes = IMAGE_SUFFIXES  # the CLI's: phones' HEIC photos too (re-encoded as PNG rows)
    heif_support()

    def key(path: Path, folder: Path) -> str:  # images/b1/x.jpg pairs with labels/b1/x.png
        return path.relative_to(folder).with_suffix("").as_posix()

    images = files_below(image_dir, suffixes)
    found = files_below(label_dir, {".png"}) if label_dir.is_dir() else []
    labels = {key(p, label_dir): p for p in found}
    if len(labels) < len(found):
        label_keys = Counter(key(p, label_dir) for p in found)
        doubled = sorted(p.name for p in found if label_keys[key(p, label_dir)] > 1)
        raise ValueError(f"labels {doubled[:4]} name one image twice; keep one label file per image")
    pairs = [(p, labels.get(key(p, image_dir))) for p in images]
    if any(label is None for _, label in pairs):
        renaming = renamed_pairing([key(p, image_dir) for p in images], set(labels))
        if renaming is not None:
            pairs = [(p, labels[rename(key(p, image_dir), *renaming)]) for p in images]
            print(f"note: labels are paired with images by name as {pairs[0][0].name} -> {pairs[0][1].name}",
                  file=sys.stderr)
    missing = [str(label_dir / f"{key(image, image_dir)}.png") for image, label in pairs if label is None]
    if not pairs:
        raise FileNotFoundError(f"no images in {image_dir} (looked for {', '.join(sorted(suffixes))})")
    if missing:
        lossy = files_below(label_dir, {".jpg", ".jpeg"}) if label_dir.is_dir() else []
        hint = (f" (labels such as {lossy[0].name} are JPEGs: JPEG compression changes class ids along every edge, "
                "so labels must be PNGs, saved from the tool that drew them)") if lossy else ""
        raise FileNotFoundError(f"need a {label_dir.name}/<name>.png for each image in {image_dir}; missing "
                                f"{missing[:3]}"
                                f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}{hint}")
    stems = Counter(key(p, image_dir) for p in images)
    twins = sorted({p.name for p in images if stems[key(p, image_dir)] > 1})
    if twins:
        raise ValueError(f"images {twins[:4]} would share one label file; keep one image per name")
    if binary_masks and len(class_names) != 2:
        raise ValueError(f"binary masks label two classes (0 and the rest), but {len(class_names)} class names were "
                         "given")
    splits = validation_split(pairs, val_fraction, seed)

    turned, seen = [], set()
    unlabelled = unlabelled_value(len(class_names))  # 255, or 65535 in 16-bit label PNGs past 255 classes

    def reader(items):
        def rows():
            for image_path, label_path in items:
                if label_colors is not None:
                    label = colors_to_ids(Image.open(label_path), label_colors, class_names, label_path)
                else:
                    label = np.asarray(Image.open(label_path), dtype=np.int64)
                if label.ndim != 2:
                    grey = grey_channel(label)  # a grey map saved as RGB (cv2.imwrite of a 3-channel array)
                    if grey is None:
                        raise ValueError(f"{label_path} has {label.shape[-1]} channels (a colour mask?); labels must "
                                         "be one channel of class ids (an L or P PNG), or give their colours with "
                                         "--label-colors")
                    if not binary_masks and (grey == unlabelled).any():  # the value check could not tell them apart
                        raise ValueError(f"{label_path} is grey in {label.shape[-1]} channels and holds {unlabelled}: "
                                         f"class ids with {unlabelled} unlabelled, or a white-on-black colour mask? "
                                         "Save labels as one channel (an L PNG), or pass --binary-masks or "
                                         "--label-colors")
                    label = grey
                if binary_masks:
                    label = (label != 0).astype(np.int64)
                values = np.unique(label)
                bad = stray_label_values(values, len(class_names))
                if bad.size:
                    raise ValueError(f"{label_path} has values {bad.tolist()[:5]} outside 0..{len(class_names) - 1} "
                                     f"and {unlabelled} (unlabelled)")
                seen.update(values.tolist())
                try:
                    image = Image.open(image_path)
                except Image.UnidentifiedImageError:  # a HEIC photo without pillow-heif: say what to install
                    raise ValueError(f"{image_path} cannot be read as an image: "
                                     f"{unread_format_hint(image_path) or 'not a format PIL reads'}") from None
                label, was_turned = as_shown(label, image)
                if was_turned:
                    turned.append(label_path.name)
                yield image, label
        return rows

    written = [write_split(out, split, reader(items), class_names) for split, items in splits.items() if items]
    if seen <= {unlabelled}:
        raise ValueError(f"every label pixel is {unlabelled} (unlabelled): there is nothing to learn from "
                         f"{root / 'labels'}")
    if seen == {0, unlabelled} and unlabelled == 255 and len(class_names) > 1:
        raise ValueError(f"the labels hold only 0 and 255, and 255 means unlabelled, so class {class_names[1]!r} "
                         "never appears: for 0/255 masks pass --binary-masks (255 becomes class 1)")
    note_absent_classes(class_names, seen)
    if not splits["validation"]:
        print(NO_VALIDATION_NOTE, file=sys.stderr)
    if turned:
        print(f"note: {len(turned)} label(s) fit the unrotated pixels of a photo with an EXIF rotation and were turned "
              f"with it (e.g. {turned[0]})", file=sys.stderr)
    return written


def _split_ids(root: Path, split: str) -> list[str]:
    name = {"validation": "val"}.get(split, split)
    for candidate in (root / f"{name}.txt", root / "ImageSets" / "Segmentation" / f"{name}.txt"):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"no split list {name}.txt in {root} or {root / 'ImageSets' / 'Segmentation'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="dataset", required=True)
    for name in ("coco-stuff", "ade20k-150", "ade20k-847", "pascal-context", "pascal-voc", "folder", "coco"):
        sub = commands.add_parser(name)
        sub.add_argument("--source", type=os.path.expanduser, required=True)
        sub.add_argument("--out", required=True, type=os.path.expanduser)
        sub.add_argument("--overwrite", action="store_true", help="replace an --out that holds another dataset")
        if name in ("folder", "coco"):  # their own images, divided here (a Roboflow export keeps its splits)
            sub.add_argument("--val-fraction", type=float, default=0.1,
                             help="share of images for validation, in [0, 1)")
        if name == "coco":
            sub.add_argument("--annotations", default=None,
                             help="the COCO JSON (default: a Roboflow export's splits, or the one JSON in "
                                  "SOURCE/annotations/ or SOURCE)")
            sub.add_argument("--background", default=None,
                             help="a class name for the pixels no annotation covers (default: unlabelled)")
            continue
        if name == "folder":
            sub.add_argument("--class-names", default=None,
                             help='"a,b,c" or a JSON list file (not needed with --label-colors or a labelmap.txt)')
            sub.add_argument("--label-colors", default=None,
                             help="colour-coded labels: a labelmap.txt (CVAT's export; read from --source by itself) "
                                  'or JSON {"name": [r, g, b], ...}')
            sub.add_argument("--binary-masks", action="store_true",
                             help="labels are masks: 0 is the first class, any other value (1, 255) the second")
            continue
        sub.add_argument("--splits", nargs="+", default=["validation"] if name != "coco-stuff" else ["train", "validation"])
        if name == "ade20k-847":
            sub.add_argument("--class-list", type=os.path.expanduser, required=True)
        if name in ("pascal-context", "pascal-voc"):
            sub.add_argument("--variant", type=int, required=True)
    args = parser.parse_args(argv)
    if hasattr(args, "val_fraction") and not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a folder")
    try:
        if args.dataset == "folder":  # read once (a file, or names typed out)
            args.class_names = parse_class_names(args.class_names)
            if args.label_colors is not None:
                args.label_colors = read_label_colors(args.label_colors)
        planned = _planned_class_names(args)
        if planned is not None and not args.overwrite:  # before hours of conversion, where the names are known
            check_same_dataset(out, planned)
        with staged_output(out, args.overwrite) as staging:
            written = _convert(args, staging)
    except (OSError, ValueError) as error:  # a missing or unreadable source: one line, and --out as it was
        parser.exit(1, f"error: {one_line(error).rstrip('.')}; {out} is unchanged.\n")
    for path in written:
        print(f"wrote {out / path.name}")


# the class names each conversion writes where they are known without reading the source: (dataset, variant)
KNOWN_CLASS_NAMES = {("coco-stuff", None): COCO_STUFF_171, ("ade20k-150", None): ADE20K_150,
                     ("pascal-voc", 20): PASCAL_VOC_20, ("pascal-voc", 21): PASCAL_VOC_21,
                     ("pascal-context", 59): PASCAL_CONTEXT_59}


def _planned_class_names(args: argparse.Namespace) -> list[str] | None:
    """The class names a conversion will write, where known without reading the source."""
    if args.dataset == "folder" and args.label_colors is not None:
        return color_classes(args.label_colors)
    if args.dataset == "folder":
        return args.class_names
    names = KNOWN_CLASS_NAMES.get((args.dataset, getattr(args, "variant", None)))
    return None if names is None else list(names)


def _convert(args: argparse.Namespace, out: Path) -> list[Path]:
    if args.dataset == "coco":
        return convert_coco(args.source, out, args.annotations, args.background, args.val_fraction)
    if args.dataset == "folder":
        return convert_folder(args.source, out, args.class_names, args.val_fraction, binary_masks=args.binary_masks,
                              label_colors=args.label_colors)
    written = []
    for split in args.splits:
        if args.dataset == "coco-stuff":
            path = convert_coco_stuff(args.source, out, split)
        elif args.dataset == "ade20k-150":
            path = convert_ade20k_150(args.source, out, split)
        elif args.dataset == "ade20k-847":
            path = convert_ade20k_847(args.source, out, split, args.class_list)
        elif args.dataset == "pascal-context":
            path = convert_pascal_context(args.source, out, split, args.variant)
        else:
            path = convert_pascal_voc(args.source, out, split, args.variant)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
