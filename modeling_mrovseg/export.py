"""Export the image path of a trained MROVSeg for runtimes without Python model code: ONNX or `torch.export`.

    python -m modeling_mrovseg.export --model DIR --height 640 --width 960 --out mrovseg.onnx
    python -m modeling_mrovseg.export --model DIR --height 640 --width 960 --out mrovseg.pt2 --format torch-export

The exported program takes the processor's `pixel_values` (1, 3, S, S) and `pixel_values_slices` (1, K, 3, S, S) for
images resized to exactly HEIGHT x WIDTH (the slice grid is fixed by that size) and returns `class_queries_logits`
(1, N, C + 1) and `masks_queries_logits` (1, N, h, w). The stored vocabulary's text embeddings are constants: no
text encoder is exported, so the classes are the checkpoint's (`set_vocabulary` and save before exporting to change
them). `ExportedSegmenter` runs a file with the matching processor and post-processing, and refuses inputs of any
other size with a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .configuration_mrovseg import one_line
from .image_processing_mrovseg import MROVSegImageProcessor
from .slicing import SliceGrid

INPUT_NAMES = ["pixel_values", "pixel_values_slices"]
OUTPUT_NAMES = ["class_queries_logits", "masks_queries_logits"]
METADATA_KEY = "mrovseg"


class MROVSegImagePath(nn.Module):
    """The model with the slice grid and vocabulary fixed: (pixel_values, pixel_values_slices) -> both logits."""

    def __init__(self, model, grid: SliceGrid, image_sizes: torch.Tensor):
        super().__init__()
        self.model = model.eval()
        self.grid = grid
        self.register_buffer("image_sizes", image_sizes, persistent=False)  # every input's: one size is exported

    def forward(self, pixel_values: torch.Tensor, pixel_values_slices: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values, pixel_values_slices=pixel_values_slices, slice_grid=self.grid,
                             image_sizes=self.image_sizes, output_auxiliary_logits=False, return_dict=True)
        return outputs.class_queries_logits, outputs.masks_queries_logits


def export_processor(model, height: int, width: int) -> MROVSegImageProcessor:
    """The processor an exported file serves: every image resized to exactly `height` x `width`."""
    return MROVSegImageProcessor.from_model_config(model.config, size={"height": height, "width": width})


def example_inputs(processor: MROVSegImageProcessor, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return dict(processor(image, return_tensors="pt"))


def export(model, height: int, width: int, out: str | Path, format: str = "onnx") -> Path:
    """Export `model`'s image path for `height` x `width` inputs to `out` (ONNX or a `torch.export` .pt2)."""
    if format not in ("onnx", "torch-export"):
        raise ValueError(f"format={format!r}: use 'onnx' or 'torch-export'.")
    if model.dtype != torch.float32:  # onnxruntime has no bfloat16 convolutions: the file would not load
        raise ValueError(f"the model's weights are {model.dtype}; export a float32 model "
                         "(from_pretrained(..., dtype=torch.float32), or model.float()).")
    processor = export_processor(model, height, width)
    inputs = example_inputs(processor, height, width)
    rows, cols, window, stride = (int(v) for v in inputs["slice_grid"][0].tolist())
    grid = SliceGrid(rows, cols, window, stride)
    module = MROVSegImagePath(model, grid, inputs["image_sizes"])
    args = (inputs["pixel_values"], inputs["pixel_values_slices"])
    metadata = {
        "height": height, "width": width, "slice_grid": [rows, cols, window, stride],
        "canvas": inputs["image_sizes"][0, 2:].tolist(), "labels": model.vocabulary,
        "processor": processor.to_dict(), "inputs": {name: list(a.shape) for name, a in zip(INPUT_NAMES, args)},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in ("onnxscript", "onnx_ir"):  # their optimiser logs a line per unfoldable op
        logging.getLogger(name).setLevel(logging.ERROR)
    with torch.no_grad():
        program = torch.export.export(module, args, strict=False)
        if format == "torch-export":
            save_atomically(out, lambda path: torch.export.save(
                program, str(path), extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)}))
            return out
        onnx_program = torch.onnx.export(program, args, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                         dynamo=True, optimize=True, verbose=False)
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)  # onnx_ir model
    save_atomically(out, lambda path: onnx_program.save(str(path)))
    return out


def save_atomically(out: Path, save: Callable[[Path], None]) -> None:
    """`save(path)` into a hidden folder beside `out` under `out`'s own name (ONNX names its external data file after
    it, past 2 GB), then moved into place: a failed or interrupted export leaves an earlier file at `out` whole."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save(staging / out.name)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == out.name):  # the file naming the others last
            os.replace(path, out.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ExportedSegmenter:
    """
    Run an exported file: image -> (H, W) class ids, with the processor and post-processing the file was made for.

    >>> segmenter = ExportedSegmenter("mrovseg.onnx")        # or a .pt2 from --format torch-export
    >>> label_map = segmenter(image)                           # image: path, PIL image or (H, W, 3) array
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        self.path = path
        try:
            props = self._load(path, providers)
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, zipfile's BadZipFile, onnxruntime's Fail
            raise ValueError(f"{path} cannot be read as an exported model (damaged, cut short, or not one): "
                             f"{one_line(error)}; export it again") from None
        if METADATA_KEY not in props or not props[METADATA_KEY]:
            raise ValueError(f"{path} was not written by modeling_mrovseg.export (no '{METADATA_KEY}' metadata).")
        self.metadata = json.loads(props[METADATA_KEY])
        self.labels: list[str] = self.metadata["labels"]
        self.processor = MROVSegImageProcessor.from_dict(self.metadata["processor"])

    def _load(self, path: Path, providers: list[str] | None) -> dict[str, str]:
        """The runtime for `path` (an onnxruntime session or the exported program) and the file's metadata."""
        self.session = self.program = None
        if path.suffix == ".onnx":
            import onnx
            import onnxruntime

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
            return props
        import zipfile

        if not zipfile.is_zipfile(path):  # torch.export.load would log a traceback before its own error
            raise ValueError("not a .pt2 archive")
        extra = {f"{METADATA_KEY}.json": ""}
        self.program = torch.export.load(str(path), extra_files=extra).module()
        return {METADATA_KEY: extra[f"{METADATA_KEY}.json"]}

    def describe(self) -> str:
        m = self.metadata
        return (f"{self.path.name} serves images resized to {m['height']} x {m['width']} "
                f"({m['slice_grid'][0]} x {m['slice_grid'][1]} slices) and the classes {', '.join(self.labels)}")

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        for name in INPUT_NAMES:
            got, wanted = list(inputs[name].shape), self.metadata["inputs"][name]
            if got != wanted:
                raise ValueError(f"{name} has shape {got}, but {self.describe()}: this file takes {wanted}. Prepare "
                                 "inputs with `segmenter.processor`, or export again with the --height/--width you need.")

    def logits(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both logits for processor outputs (checked against the exported shapes)."""
        self.check_inputs(inputs)
        if self.session is not None:
            feeds = {name: np.asarray(inputs[name], dtype=np.float32) for name in INPUT_NAMES}
            class_logits, mask_logits = self.session.run(OUTPUT_NAMES, feeds)
            return torch.from_numpy(class_logits), torch.from_numpy(mask_logits)
        with torch.no_grad():
            return self.program(*(torch.as_tensor(inputs[name]) for name in INPUT_NAMES))

    def __call__(self, image) -> np.ndarray:
        from .modeling_mrovseg import MROVSegOutput
        from .pipelines import read_rgb

        array = read_rgb(image)
        inputs = self.processor(array, return_tensors="pt")
        class_logits, mask_logits = self.logits(inputs)
        outputs = MROVSegOutput(class_queries_logits=class_logits, masks_queries_logits=mask_logits,
                                image_sizes=inputs["image_sizes"])
        return self.processor.post_process_semantic_segmentation(outputs, target_sizes=[array.shape[:2]])[0].numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", type=os.path.expanduser, required=True, help="MROVSeg checkpoint folder or Hub id")
    parser.add_argument("--height", type=int, required=True, help="images are resized to exactly this height")
    parser.add_argument("--width", type=int, required=True, help="... and this width")
    parser.add_argument("--out", required=True, type=os.path.expanduser, help="output file (.onnx or .pt2)")
    parser.add_argument("--format", choices=["onnx", "torch-export"], default=None,
                        help="follows the --out suffix (.onnx -> onnx, .pt2 -> torch-export)")
    args = parser.parse_args(argv)
    for name in ("height", "width"):
        if not 1 <= getattr(args, name) <= 8192:
            parser.error(f"--{name} {getattr(args, name)} must lie in [1, 8192]")
    # the suffix says how ExportedSegmenter reads the file back, so it decides the format (checked before exporting)
    out = Path(args.out)
    by_suffix = {".onnx": "onnx", ".pt2": "torch-export"}.get(out.suffix.lower())
    if by_suffix is None:
        parser.error(f"--out {out} must end in .onnx (ONNX) or .pt2 (torch.export): the suffix says how it is read")
    if args.format not in (None, by_suffix):
        parser.error(f"--format {args.format} does not match --out {out} ({by_suffix}); leave --format out")
    if out.is_dir():
        parser.error(f"--out {out} is a folder; give a file name such as {out / 'mrovseg.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {out} cannot be written: {error.strerror or error}")
    format = by_suffix
    from .modeling_mrovseg import MROVSegForOpenVocabSegmentation

    try:
        model = MROVSegForOpenVocabSegmentation.from_pretrained(args.model, dtype=torch.float32)  # as saved or not
        model.check_complete()
    except (OSError, ValueError) as error:
        print(f"error: cannot load {args.model}: {error}", file=sys.stderr)
        return 2
    path = export(model, args.height, args.width, args.out, format)
    print(ExportedSegmenter(path).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
