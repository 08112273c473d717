"""Segmentation datasets for training and evaluation: loading, deterministic augmentation, batching.

One schema for every dataset: an `image` column and a `label` column (images, or file paths or `{"bytes", "path"}`
dicts as pandas writes them, cast to images on load; label values are class indices,
255 = unlabelled, or 65535 in 16-bit label maps past 255 classes: `unlabelled_value`) plus the list of class names
(`class_names.json` or `id2label.json` beside local parquet files or in a `save_to_disk` folder). Everything random
is derived from (seed, epoch, position), so a run is reproducible whatever the number of processes and wherever it
is resumed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from modeling_mrovseg.configuration_mrovseg import IGNORE_INDEX
from modeling_mrovseg.cli import IMAGE_SUFFIXES, one_line
from modeling_mrovseg.image_processing_mrovseg import to_rgb_uint8
from modeling_mrovseg.text_classifier import parse_class_names


@contextlib.contextmanager
def loading(flag: str, value: str):
    """Around what a script loads from its arguments (dataset, model): a folder or Hub id that cannot be loaded
    (offline, not found, not a dataset or checkpoint, no class names) ends the run with one line naming the argument,
    not a traceback."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load {flag} {value}: {one_line(error)}") from None


# where a dataset keeps its class names: this project's list, or the id -> name map of Hub datasets
# (`segments/sidewalk-semantic`) and transformers' configs
NAME_FILES = ("class_names.json", "id2label.json")


def load_segmentation_dataset(name_or_path: str, split: str, class_names: list[str] | str | None = None):
    """
    (dataset, class names) for a local folder of parquet files (`<split>.parquet`, `<split>/*.parquet`, or a Hub
    dataset's layout such as `data/<split>-00000-of-00002.parquet`), a `DatasetDict.save_to_disk` folder or a Hub
    dataset id (`datasets.load_dataset(id, split=split)`). Class names from `class_names`, else a `class_names.json`
    or `id2label.json` in the folder or repository, else the `label` feature's names. Image and label columns under
    another usual name (`pixel_values`, `annotation` ...) are renamed `image` and `label`.
    """
    import datasets

    names = parse_class_names(class_names)
    path = Path(name_or_path).expanduser()
    if path.exists():
        dataset = standard_columns(load_local_split(path, split), name_or_path)
        stored = next((path / name for name in NAME_FILES if (path / name).is_file()), path / NAME_FILES[0])
        if stored.is_file():
            own = parse_class_names(str(stored))
            if names is not None and len(names) != len(own):  # other names for the same ids may be wanted; not more
                raise ValueError(f"{len(names)} class names given, but the dataset's labels number {len(own)} classes "
                                 f"({stored}): class ids would point at the wrong names")
            names = own if names is None else names
    else:
        dataset = standard_columns(datasets.load_dataset(name_or_path, split=split), name_or_path)
        if names is None:  # read from the label column, whose name is settled now
            names = _hub_class_names(name_or_path, dataset)
    if names is None:
        raise ValueError(f"no class names for {name_or_path}: pass class_names (a list or a JSON file)")
    return as_image_columns(dataset, path if path.is_dir() else path.parent if path.exists() else None), list(names)


# the names datasets give their images and label maps (`segments/sidewalk-semantic`: pixel_values and label;
# `scene_parse_150`: image and annotation), first choice first
IMAGE_COLUMNS = ("image", "pixel_values", "img")
LABEL_COLUMNS = ("label", "annotation", "mask", "segmentation", "semantic_map", "label_map", "gt")


def standard_columns(dataset, name: str):
    """`image` and `label` columns, renamed from another of their usual names (`IMAGE_COLUMNS`, `LABEL_COLUMNS`):
    the first that holds pictures (images, paths, bytes or arrays). A column of one number per image (an image
    classification dataset's `label`) is no label map and is passed over; none left is an error naming the columns."""
    renames = {}
    for wanted, accepted in (("image", IMAGE_COLUMNS), ("label", LABEL_COLUMNS)):
        present = [column for column in accepted if column in dataset.column_names]
        pictures = [column for column in present if _holds_pictures(dataset.features[column])]
        if not pictures:
            found = (f"its {', '.join(repr(c) for c in present)} column holds one value per image (image "
                     "classification?), not a map"
                     if present else f"none of {', '.join(accepted)}")
            raise ValueError(f"{name} has no {wanted} column: {found} (its columns: "
                             f"{', '.join(dataset.column_names)}). Rename yours (datasets' rename_column, then "
                             "save_to_disk) or convert the dataset with processing.convert")
        if pictures[0] != wanted:
            renames[pictures[0]] = wanted
    clashing = [column for column in renames.values() if column in dataset.column_names]
    if clashing:  # a `label` of one scene class per image gives way to the map renamed onto its name
        dataset = dataset.remove_columns(clashing)
    return dataset.rename_columns(renames) if renames else dataset


def _holds_pictures(feature) -> bool:
    """An image column: `datasets.Image`, file paths, `{"bytes", "path"}` dicts or arrays (Array2D/3D, sequences)."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    if isinstance(feature, dict):
        return "bytes" in feature
    arrays = (datasets.Image, datasets.Array2D, datasets.Array3D, list)
    return isinstance(feature, arrays) or hasattr(feature, "feature")  # datasets' List / Sequence / LargeList


def as_image_columns(dataset, folder: Path | None):
    """
    `image` and `label` as `datasets.Image` columns. A parquet file written with pandas holds file paths (strings)
    or `{"bytes", "path"}` dicts, which datasets reads back as such, not as images; cast, they decode as any image
    column does. Relative paths are taken from the dataset's folder (else the working directory); a path that
    names no file is an error here, naming it, not at the step that first reads it.
    """
    import datasets

    for column in ("image", "label"):
        feature = dataset.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            paths = [_resolved(value, folder) for value in dataset[column]]
            absent = [value for value in paths if value is None or not Path(value).is_file()]
            if absent:
                raise FileNotFoundError(f"{len(absent)} of the {len(paths)} {column} paths name no file (the first: "
                                        f"{absent[0]!r}); relative paths are read from {folder or Path.cwd()}")
            dataset = dataset.remove_columns(column).add_column(column, paths)
        elif not (isinstance(feature, dict) and "bytes" in feature):  # an Image column already, or arrays
            continue
        dataset = dataset.cast_column(column, datasets.Image())
    return dataset


def _resolved(value: str | None, folder: Path | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and folder is not None and (folder / path).is_file():
        path = folder / path
    return str(path)


def load_local_split(path: Path, split: str):
    """One split of a local dataset, or a part of splits as `load_dataset` takes them ("validation[:100]",
    "train[:10%]+validation"), in every layout below: each named split is loaded whole, then sliced."""
    import datasets

    if "[" not in split and "+" not in split:
        return load_whole_split(path, split)
    names = [part.split("[", 1)[0].strip() for part in split.split("+")]
    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"split {split!r} is not a split or a slice of one (such as 'validation[:100]' or "
                         f"'train[:10%]'): {one_line(error)}") from None
    whole = {name: load_whole_split(path, name) for name in dict.fromkeys(names)}
    ranges = [part for part in instruction.to_absolute({name: len(rows) for name, rows in whole.items()})
              if part.to > part.from_]
    if not ranges:
        raise ValueError(f"split {split!r} selects no rows of {path} "
                         f"({', '.join(f'{name}: {len(rows)} rows' for name, rows in whole.items())})")
    parts = [whole[part.splitname].select(range(part.from_, part.to)) for part in ranges]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_whole_split(path: Path, split: str):
    """
    One split of a local dataset: a `DatasetDict.save_to_disk` folder (`datasets.load_from_disk`), else a parquet file
    or folder: `<split>.parquet` or `<split>/*.parquet` (any split name), else datasets' own split patterns (a
    downloaded Hub dataset's `data/train-00000-of-00002.parquet`), over parquet files only: datasets would make a
    folder of images an imagefolder labelled by subfolder. A file whose name merely holds the split
    (`pretrain.parquet` for "train") is not that split. A `Dataset.save_to_disk` folder serves only the split it was
    saved from: the same rows must not serve as training and evaluation data alike.
    """
    import datasets

    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise FileNotFoundError(f"no split {split!r} in {path} (a save_to_disk folder with the split(s) "
                                    f"{', '.join(splits)})")
        return splits[split]
    if path.is_dir() and (path / "state.json").is_file():  # Dataset.save_to_disk: one split, if it names one
        dataset = datasets.load_from_disk(str(path))
        if dataset.split is not None and str(dataset.split) == split:
            return dataset
        held = f"the {str(dataset.split)!r} split" if dataset.split is not None else "one dataset without a split name"
        whole = (f"give the folder above it, {path.parent}, and name the split" if
                 (path.parent / "dataset_dict.json").is_file() else
                 "ask for the split it holds, or save a DatasetDict ({'train': ..., 'validation': ...})")
        raise ValueError(f"{path} holds {held} (Dataset.save_to_disk), not the {split!r} split: {whole}")
    if path.is_file() and _head(path) != b"PAR1":  # a photo, a CSV ...: not "Parquet magic bytes not found"
        raise ValueError(f"{path} is no parquet file; give a dataset folder (or a .parquet file)")
    candidates = [path / f"{split}.parquet", *sorted((path / split).glob("*.parquet"))] if path.is_dir() else [path]
    files = [str(f) for f in candidates if f.is_file()]
    if files:
        try:
            return datasets.load_dataset("parquet", data_files={split: files}, split=split)
        except ValueError as error:  # datasets: 'Instruction "train" corresponds to no data!'
            if "corresponds to no data" not in str(error):
                raise
            raise ValueError(f"the {split!r} split in {path} holds no rows ({', '.join(files)})") from None
    if path.is_dir() and any(path.rglob("*.parquet")):
        try:
            return datasets.load_dataset("parquet", data_dir=str(path), split=split)
        except ValueError as error:  # 'Unknown split "test". Should be one of [...]'
            raise FileNotFoundError(f"no parquet file for split {split!r} in {path}: {one_line(error)}") from None
    pictures = next((f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES), None)
    hint = (f": it holds images ({pictures.relative_to(path)}); make them a dataset first: python -m "
            f"processing.convert folder --source {path} --class-names ... --out DIR" if pictures else "")
    raise FileNotFoundError(f"no parquet file for split {split!r} in {path}{hint}")


def _head(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(4)


def _hub_class_names(repo_id: str, dataset):
    feature = dataset.features["label"]
    while not hasattr(feature, "names") and hasattr(feature, "feature"):  # label maps as sequences of ClassLabel
        feature = feature.feature
    if hasattr(feature, "names"):
        return list(feature.names)
    from huggingface_hub import hf_hub_download

    for name in NAME_FILES:
        try:
            stored = hf_hub_download(repo_id, name, repo_type="dataset")
        except Exception:  # noqa: BLE001 - any failure means the names are simply not on the Hub
            continue
        return parse_class_names(stored)
    return None


def grey_channel(label: np.ndarray) -> np.ndarray | None:
    """The one channel of an (H, W, C) label whose colour channels are equal (a grey map saved as RGB or RGBA, its
    alpha channel aside), or None for a colour mask."""
    colour = label[..., :3] if label.shape[-1] >= 3 else label[..., :1]
    return None if (colour[..., 1:] != colour[..., :1]).any() else label[..., 0]


def row_arrays(dataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """`as_arrays` of `dataset[index]`; bytes that are no image say so without PIL's "<_io.BytesIO object at ...>"."""
    try:
        example = dataset[index]
    except Image.UnidentifiedImageError:
        raise ValueError("its image or label holds bytes that are no image PIL reads (a damaged or truncated "
                         "file?)") from None
    return as_arrays(example)


def as_arrays(example) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) int64 label of one dataset row.

    The image reads as the image processor reads it at inference (`to_rgb_uint8`: EXIF orientation, 16-bit scaled,
    transparency on white), so a model trains on what it will see. A label stored with equal colour channels (a grey
    map saved as RGB or RGBA) is read from one; a colour mask is an error, not its red channel."""
    for column in ("image", "label"):
        if example[column] is None:  # a missing value (a row written without its label)
            raise ValueError(f"its {column} is missing (None)")
    image = example["image"]
    if isinstance(image, (list, tuple)):  # an Array3D or nested-sequence column: datasets gives nested lists
        image = np.asarray(image)
    image = to_rgb_uint8(image)
    label = np.asarray(example["label"])  # a PIL image (P, L, I;16, RGB, F) or an array
    if np.issubdtype(label.dtype, np.floating) and not (np.isfinite(label).all() and (label == np.round(label)).all()):
        raise ValueError("a label holds values that are no whole numbers (a label map resized with bilinear "
                         "interpolation?); labels must be class ids")
    label = label.astype(np.int64)
    if label.ndim == 3:
        grey = grey_channel(label)
        if grey is None:
            raise ValueError(f"a label has {min(label.shape[-1], 3)} different colour channels (a colour mask?); "
                             "labels must be one channel of class ids")
        label = grey
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    return image, label


@dataclass
class SegmentationAugment:
    """SAN's recipe: random short-side scaling (0.5-1.5 x crop), random crop, horizontal flip, colour jitter."""

    crop_size: int = 640
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    jitter: float = 0.2
    ignore_index: int = IGNORE_INDEX  # the label of padding: the model's unlabelled value

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        height, width = label.shape
        short = self.crop_size * rng.uniform(*self.scale_range)
        scale = short / min(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pil = Image.fromarray(image).resize(size, Image.BILINEAR)
        lab = Image.fromarray(label.astype(np.int32)).resize(size, Image.NEAREST)
        image, label = np.asarray(pil), np.asarray(lab, dtype=np.int64)
        crop = self.crop_size
        pad_h, pad_w = max(0, crop - image.shape[0]), max(0, crop - image.shape[1])
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        top = int(rng.integers(0, image.shape[0] - crop + 1))
        left = int(rng.integers(0, image.shape[1] - crop + 1))
        image, label = image[top : top + crop, left : left + crop], label[top : top + crop, left : left + crop]
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.jitter:
            pil = Image.fromarray(np.ascontiguousarray(image))
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                pil = enhancer(pil).enhance(1 + rng.uniform(-self.jitter, self.jitter))
            image = np.asarray(pil)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


class TrainingRowError(ValueError):
    """A training row that cannot be used, named by its row: deep in a run it would otherwise stop the run with the
    reason but not the row, and a resume would meet it again at the same position."""


def sample_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for the sample at global `position` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepBatches(torch.utils.data.Dataset):
    """
    Item k is this process's share of global micro-batch k: the epoch's seeded permutation of the dataset is cut
    into global batches of `global_batch` samples, and process `rank` takes positions [rank*b, (rank+1)*b). A
    DataLoader over `range(start, stop)` of these items (batch_size=None) therefore resumes at any step and gives
    every process count the same global batches.
    """

    def __init__(self, dataset, processor, augment: SegmentationAugment, seed: int, global_batch: int,
                 rank: int = 0, world_size: int = 1, num_classes: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.dataset, self.processor, self.augment = dataset, processor, augment
        self.num_classes = num_classes  # label values past it are refused, naming the row
        self.seed, self.global_batch, self.rank, self.world_size = seed, global_batch, rank, world_size
        self.per_process = global_batch // world_size
        self.batches_per_epoch = max(1, len(dataset) // global_batch)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the last epoch used

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of the dataset for `epoch` (computed once per epoch and process)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)))
        return self._order[1]

    def __len__(self) -> int:  # effectively unbounded: the training loop decides when to stop
        return 2**31 - 1

    def check_label_values(self, label: np.ndarray) -> None:
        """Values that are neither a class id nor unlabelled (labels of another vocabulary): the model's loss refused
        them deep in a step, with a traceback that named no row."""
        if self.num_classes is None:
            return
        ignore = self.processor.ignore_index
        stray = stray_label_values(label, self.num_classes, ignore)
        if stray:
            raise ValueError(f"its label holds {stray[:5]}, neither class ids 0..{self.num_classes - 1} of "
                             f"the {self.num_classes} class names nor unlabelled ({ignore})")

    def positions(self, index: int) -> list[int]:
        """Global sample positions (epoch-major) of this process's share of micro-batch `index`."""
        start = index * self.global_batch + self.rank * self.per_process
        return list(range(start, start + self.per_process))

    def __getitem__(self, index: int) -> dict:
        images, labels, seeds = [], [], []
        for position in self.positions(index):
            epoch, offset = divmod(position, self.batches_per_epoch * self.global_batch)
            row = int(self.epoch_order(epoch)[offset % len(self.dataset)])
            seed = sample_seed(self.seed, position)
            try:
                image, label = row_arrays(self.dataset, row)
                self.check_label_values(label)
            except (OSError, ValueError) as error:
                raise TrainingRowError(f"training row {row}: {one_line(error)}") from error
            image, label = self.augment(image, label, np.random.default_rng(seed))
            images.append(image)
            labels.append(label)
            seeds.append(seed)
        batch = self.processor(images, segmentation_maps=labels, do_resize=False, return_pixel_mask=True,
                               return_tensors="pt")  # pixel_mask: the canvas for a compiled step
        batch["loss_seeds"] = torch.tensor(seeds, dtype=torch.long)
        return dict(batch)


def stray_label_values(label: np.ndarray, num_classes: int, ignore: int) -> list[int]:
    """The values of a label map that are neither a class id (0..num_classes - 1) nor `ignore`, in order."""
    return np.unique(label[(label != ignore) & ((label < 0) | (label >= num_classes))]).tolist()


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard of one process: every `world_size`-th item, starting at `rank`."""
    return list(range(rank, num_items, world_size))


__all__ = ["load_segmentation_dataset", "as_arrays", "SegmentationAugment", "StepBatches", "TrainingRowError",
           "sample_seed", "shard_indices", "stray_label_values", "IGNORE_INDEX"]
