"""Peak memory and latency of full-resolution inference with a ViT-B/16-shaped MROVSeg (random weights).

Each size runs in its own process so peak RSS is that run's alone:
    python -m benchmarks.memory --sizes 1024 2048 4096 --slice-batch-size 16
Images are segmented at their own resolution (no downscaling: `shortest_edge` = the image side).

    python -m benchmarks.memory --photo 12000x10000
runs `mrovseg segment` on one photo of that size with a tiny model (`photo_run`: the cost of the photo's size alone).

    python -m benchmarks.memory --training
traces one bf16 training step of ViT-B/16 (batch 8, 640 px crops) with fake tensors and reports what stays alive
(`training_memory`), with CLIP's lean QuickGELU and with transformers' own side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time


def run_one(size: int, slice_batch_size: int, labels: int) -> dict:
    import numpy as np
    import torch

    from benchmarks.run import vit_b16_model
    from modeling_mrovseg import MROVSegImageProcessor

    model = vit_b16_model(num_labels=labels, slice_batch_size=slice_batch_size)
    processor = MROVSegImageProcessor(size={"shortest_edge": size, "longest_edge": size})
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.inference_mode():
        inputs = processor(image, return_tensors="pt")
        outputs = model(**inputs)
        segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[(size, size)])[0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"size": size, "slices": int(inputs["pixel_values_slices"].shape[1]), "seconds": round(seconds, 1),
            "peak_rss_gb": round(peak / 1024**2, 2), "peak_rss_before_run_gb": round(baseline / 1024**2, 2),
            "output_shape": list(segmentation.shape), "slice_batch_size": slice_batch_size}


@contextlib.contextmanager
def plain_quick_gelu(model):
    """Within it, CLIP's layers run transformers' QuickGELU (which keeps its sigmoid for the backward) instead of the
    model's lean one: the other side of the side-by-side figures."""
    from transformers.activations import QuickGELUActivation

    layers = model.mrovseg.vision_model.encoder.layers
    lean = [layer.mlp.activation_fn for layer in layers]
    for layer in layers:
        layer.mlp.activation_fn = QuickGELUActivation()
    try:
        yield model
    finally:
        for layer, activation in zip(layers, lean):
            layer.mlp.activation_fn = activation


def training_memory(preset: str = "vit-b-16", batch: int = 8, crop: int = 640, num_labels: int = 150,
                    plain_activation: bool = False) -> dict:
    """
    GB alive in one bf16-autocast training step (forward, backward, clipping, AdamW) of `preset` on `batch` crops,
    traced on the CPU with fake tensors (shapes and dtypes, no compute, seconds for ViT-B/16): model and optimizer
    state, what the forward leaves for the backward, and the step's peak. A proxy for a GPU's peak allocation (no
    allocator caching, no library workspaces); the loss is the sum of every output, as the set-prediction loss's
    matching needs values (its own tensors are point-sampled, a few MB). `plain_activation`: transformers'
    QuickGELU in CLIP instead of the lean one, for the side-by-side figure.
    """
    import weakref

    import numpy as np
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    from modeling_mrovseg import MROVSegConfig, MROVSegForOpenVocabSegmentation, MROVSegImageProcessor

    class Alive(TorchDispatchMode):
        """Bytes of the storages that ops created and that are still referenced; the most at any point."""

        def __init__(self):
            super().__init__()
            self.storages, self.now, self.peak = WeakIdKeyDictionary(), 0, 0

        def released(self, size: int) -> None:
            self.now -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self.storages:
                    storage = tensor.untyped_storage()
                    self.storages[storage] = True
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self.released, storage.nbytes())
                    self.peak = max(self.peak, self.now)
            return out

    names = [f"class {i}" for i in range(num_labels)]
    config = MROVSegConfig.from_preset(preset, id2label=dict(enumerate(names)),
                                       label2id={n: i for i, n in enumerate(names)})
    processor = MROVSegImageProcessor.from_model_config(config)
    images = list(np.zeros((batch, crop, crop, 3), dtype=np.uint8))
    shapes = processor(images, do_resize=False, return_pixel_mask=True, return_tensors="pt")
    with torch.device("meta"):
        model = MROVSegForOpenVocabSegmentation(config).train()
    gb = 1024**3
    alive = Alive()
    activation = plain_quick_gelu(model) if plain_activation else contextlib.nullcontext()
    with activation, FakeTensorMode(allow_non_fake_inputs=True), alive:
        model.to_empty(device="cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        inputs = {name: value if name == "slice_grid" else torch.empty(value.shape, dtype=value.dtype)
                  for name, value in shapes.items()}
        for step in range(2):  # the second step holds the optimizer's state from the start, as every later one
            before, alive.peak = alive.now, alive.now
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = model(**inputs)
                loss = sum(value.float().sum() for value in tree_leaves(
                    [outputs.class_queries_logits, outputs.masks_queries_logits, outputs.auxiliary_logits]))
            kept = alive.now - before
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.01)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del outputs, loss
    return {"preset": preset, "batch": batch, "crop": crop, "plain_activation": plain_activation,
            "model_and_optimizer_gb": before / gb, "kept_for_backward_gb": kept / gb, "peak_gb": alive.peak / gb}


def photo_run(width: int, height: int) -> dict:
    """`mrovseg segment` on one width x height photo with a tiny model at the default resolution (shortest edge 640):
    what the photo's size alone costs (reading it, full-size labels and segment masks, the label PNG and the
    overlay), in a child process whose peak RSS is its own. Then the overlay written at zlib level 6 (PIL's default)
    and 1 (the CLI's) side by side: seconds and MB."""
    import io
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from modeling_mrovseg import MROVSegForOpenVocabSegmentation
    from processing.tiny_clip import build_tiny_clip

    folder = Path(tempfile.mkdtemp(prefix="mrovseg-photo-"))
    clip = build_tiny_clip(folder / "clip")
    MROVSegForOpenVocabSegmentation.from_clip(str(clip), vocabulary=["field", "road", "roof", "tree", "water"]
                                              ).save_pretrained(folder / "model")
    small = np.random.default_rng(0).integers(0, 256, (max(1, height // 100), max(1, width // 100), 3), np.uint8)
    Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(folder / "photo.jpg", quality=90)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "modeling_mrovseg.cli", "segment", str(folder / "photo.jpg"),
                          "--model", str(folder / "model"), "--out", str(folder / "out"), "--quiet",
                          "--max-pixels", str(width * height)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        return {"photo": f"{width}x{height}", "error": run.stderr.strip().splitlines()[-1]}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the overlay: the photo and its legend
    try:
        overlay = Image.open(folder / "out" / "photo_overlay.png")
        overlay.load()
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    writes = {}
    for level in (6, 1):
        buffer, begin = io.BytesIO(), time.perf_counter()
        overlay.save(buffer, format="PNG", compress_level=level)
        writes[level] = (time.perf_counter() - begin, buffer.tell() / 1e6)
    return {"photo": f"{width}x{height}", "megapixels": round(width * height / 1e6, 1),
            "cli_seconds": round(seconds, 1), "cli_peak_rss_gb": round(peak / 1024**2, 2),
            "overlay_png_seconds_level6_vs_1": [round(writes[6][0], 1), round(writes[1][0], 1)],
            "overlay_png_mb_level6_vs_1": [round(writes[6][1], 3), round(writes[1][1], 3)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--slice-batch-size", type=int, default=16)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--training", action="store_true", help="trace one ViT-B/16 training step's memory instead")
    parser.add_argument("--photo", metavar="WIDTHxHEIGHT", help="the CLI on one photo of that size instead")
    args = parser.parse_args(argv)
    if args.photo:
        width, height = (int(side) for side in args.photo.lower().split("x"))
        print(json.dumps(photo_run(width, height)), flush=True)
        return
    if args.training:
        for plain in (True, False):
            row = training_memory(plain_activation=plain)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.slice_batch_size, args.labels)))
        return
    for size in args.sizes:
        result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--one", str(size), "--slice-batch-size",
                                 str(args.slice_batch_size), "--labels", str(args.labels)],
                                capture_output=True, text=True)
        print(result.stdout.strip().splitlines()[-1] if result.returncode == 0 else
              json.dumps({"size": size, "error": result.stderr.strip().splitlines()[-1]}), flush=True)


if __name__ == "__main__":
    main()
