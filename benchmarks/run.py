"""MROVSeg benchmark suite: every figure a ratio of measurements taken side by side in one run.

    python -m benchmarks.run [--quick] [--only latency metric processor training aten postprocess]

1. Latency and peak memory against input size for a ViT-B/16-shaped MROVSeg (random weights, fp32) against
   (a) its single-resolution ablation, (b) full-resolution CLIP (interpolated position embeddings) feeding the
   same decoder, (c) the CLIP passes over the global view and slices alone: the floor our model cannot beat.
   Each (variant, size) runs in its own process, so its peak RSS is its own; timings are medians after a warm-up.
2. FLOPs (torch.utils.flop_counter, counted on the meta device) and achieved FLOP/s against the machine's
   measured fp32 matrix-multiply rate.
3. The streaming mean-IoU metric against a per-image numpy implementation of the same formula (500 maps of
   512 x 512): speed ratio, identical values.
4. Image-processor throughput at 2048 x 1024 and training-step time for the tiny and ViT-B/16 configs.
5. ATen ops dispatched by inference, the loss and a training step (a CPU proxy for GPU kernel launches), and
   post-processing's boundary labelling against resampling every class map, on the same scores.
Results go to benchmarks/RESULTS.md (section "performance") with the command and the machine; `--only` measures some
sections again and keeps the others' saved figures, each section naming when it was measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZES = [(512, 512), (1024, 1024), (1024, 2048), (2048, 2048), (4096, 4096)]  # (height, width)
QUICK_SIZES = [(512, 512), (1024, 2048)]
VARIANTS = ["mrovseg", "single_resolution", "full_resolution_clip", "clip_floor"]
SECTIONS = ["latency", "metric", "processor", "training", "aten", "postprocess"]
FULL_RES_MAX_PIXELS = 2048 * 2048  # beyond this the quadratic full-resolution pass is estimated, not run


# ---------------------------------------------------------------- models
def vit_b16_model(num_labels: int = 20, **overrides):
    """A ViT-B/16-shaped MROVSeg with random weights (seed 0) and `num_labels` placeholder classes, in eval mode."""
    from modeling_mrovseg import MROVSegConfig, MROVSegForOpenVocabSegmentation

    names = [f"class {i}" for i in range(num_labels)]
    config = MROVSegConfig.from_preset("vit-b-16", id2label=dict(enumerate(names)),
                                       label2id={n: i for i, n in enumerate(names)}, **overrides)
    torch.manual_seed(0)
    return MROVSegForOpenVocabSegmentation(config).eval()


def clip_floor(model, inputs) -> torch.Tensor:
    """Plain CLIPVisionModel over the global view and every slice, chunked like the model: the floor."""
    images = torch.cat([inputs["pixel_values"], inputs["pixel_values_slices"].flatten(0, 1)])
    chunk = model.config.slice_batch_size or images.shape[0]
    outputs = [model.mrovseg.vision_model(pixel_values=images[i : i + chunk]).last_hidden_state for i in range(0, len(images), chunk)]
    return outputs[-1]


def prepare(size, slice_batch_size=16):
    from modeling_mrovseg import MROVSegImageProcessor

    height, width = size
    processor = MROVSegImageProcessor(size={"height": height, "width": width})
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return processor, image


def run_variant(variant: str, size, runs: int) -> dict:
    """One (variant, size) in this process: warm-up on a small input, then `runs` timed runs."""
    torch.set_num_threads(torch.get_num_threads())
    model = vit_b16_model(slice_batch_size=16, use_high_res=variant != "single_resolution",
                          high_res_encoding="full_image" if variant == "full_resolution_clip" else "slices")

    def once(sz):
        processor, image = prepare(sz)
        inputs = processor(image, return_tensors="pt")
        if variant == "clip_floor":
            return clip_floor(model, inputs)
        if variant == "single_resolution":
            inputs = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}
        outputs = model(**inputs)
        return processor.post_process_semantic_segmentation(outputs, target_sizes=[sz])[0]

    with torch.inference_mode():
        once((448, 448))  # warm-up: allocator, kernels, lazy inits
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            once(size)
            times.append(time.perf_counter() - start)
    return {"variant": variant, "size": list(size), "seconds": statistics.median(times), "runs": runs,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def count_flops(variant: str, size) -> float:
    """FLOPs of one forward (CLIP and decoder; post-processing excluded), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_mrovseg.slicing import SliceGrid

    with torch.device("meta"):
        model = vit_b16_model(slice_batch_size=None, use_high_res=variant != "single_resolution",
                              high_res_encoding="full_image" if variant == "full_resolution_clip" else "slices")
    model.requires_grad_(False)  # the counter's module tracker hooks tensors that require grad
    grid = SliceGrid.covering(size[0], size[1], 224, 0)
    with torch.device("meta"):
        inputs = {"pixel_values": torch.zeros(1, 3, 224, 224),
                  "pixel_values_slices": torch.zeros(1, grid.num_slices, 3, 224, 224),
                  "slice_grid": torch.tensor([[grid.rows, grid.cols, grid.window, grid.stride]], device="cpu"),
                  "image_sizes": torch.tensor([[*size, grid.height, grid.width]], device="cpu")}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if variant == "clip_floor":
            images = torch.zeros(1 + grid.num_slices, 3, 224, 224, device="meta")
            model.mrovseg.vision_model(pixel_values=images)
        elif variant == "single_resolution":
            model(pixel_values=inputs["pixel_values"])
        else:
            model(**inputs)
    return float(counter.get_total_flops())


class DispatchTally:
    """While active: ATen ops dispatched (a CPU proxy for GPU kernel launches) and the bytes they read and write (a
    proxy for a memory-bound GPU step's time): views move nothing, gathers read what they write."""

    # ops as dispatched: reshape, flatten and unflatten arrive as `view`, or as `clone` (counted) + `_unsafe_view`
    VIEWS = {"view", "permute", "transpose", "select", "slice", "unsqueeze", "squeeze", "expand", "_unsafe_view",
             "as_strided", "alias", "t", "detach", "unbind", "split"}
    GATHERS = {"index", "index_select"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tally = self
        self.ops, self.bytes, self.data_free = 0, 0, 0

        def size(values) -> int:
            return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tally.ops += 1
                tally.data_free += moves_no_data(func, args, kwargs, out)
                name = func.__name__.split(".")[0]
                if name in tally.GATHERS:  # the gathered elements read and written, and the indices
                    tally.bytes += 2 * size(out) + size(args[1:])
                elif name in ("index_put", "index_put_"):  # the values read and written, and the indices
                    tally.bytes += 2 * size(args[2]) + size(args[1])
                elif name not in tally.VIEWS:
                    tally.bytes += size(args) + size(kwargs) + size(out)
                return out

        self.mode = Mode()

    def __enter__(self) -> "DispatchTally":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def moves_no_data(func, args, kwargs, out) -> bool:
    """Whether a dispatched op launched no kernel: it writes none of its arguments and every tensor it returns shares
    storage with an argument (views, no-op casts and `reshape`s, constants lifted as they are)."""
    from torch.utils._pytree import tree_leaves

    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        return False
    inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(outputs) and all(t.untyped_storage().data_ptr() in inputs for t in outputs)


def count_dispatched(fn) -> int:
    """ATen ops dispatched while `fn()` runs (a CPU proxy for GPU kernel launches)."""
    with DispatchTally() as tally:
        fn()
    return tally.ops


def op_count_model(slice_batch_size: int | None = 32, num_classes: int = 150, narrow_decoder: bool = False):
    """ViT-B/16's structure with CLIP at width 64 (`narrow_decoder`: the decoders too): the same layers, queries,
    decoders and code path, and op counts do not depend on widths, so counting runs in seconds."""
    from modeling_mrovseg import MROVSegConfig, MROVSegForOpenVocabSegmentation

    names = [f"class {i}" for i in range(num_classes)]
    config = MROVSegConfig.from_preset("vit-b-16", id2label=dict(enumerate(names)),
                                       label2id={n: i for i, n in enumerate(names)}, slice_batch_size=slice_batch_size)
    for tower in (config.vision_config, config.text_config):
        tower.hidden_size, tower.intermediate_size, tower.num_attention_heads = 64, 128, 2
    if narrow_decoder:
        config.hidden_dim, config.decoder_ffn_dim = 32, 64
        config.pixel_decoder_channels = [16, 8, 8]
    torch.manual_seed(0)
    return MROVSegForOpenVocabSegmentation(config)


def count_aten_ops(size, bf16_weights: bool = False, slice_batch_size: int | None = 32, detail: bool = False):
    """ATen ops dispatched by one inference forward plus post-processing (150 classes, bf16 autocast): a CPU proxy
    for GPU kernel launches (`op_count_model`). `detail`: a dict that also splits off the ops that move no data (no
    kernel on a GPU) and those dispatched after CLIP's passes over the global view and the slices (`_run_clip`)."""
    model = op_count_model(slice_batch_size).eval()
    if bf16_weights:
        model = model.to(torch.bfloat16)
    processor, image = prepare(size)
    inputs = processor(image, return_tensors="pt")
    core, in_clip = model.mrovseg, {"ops": 0, "data_free": 0}
    run_clip = core._run_clip

    def counted_clip(*args, **kwargs):  # the tally at CLIP's start and end
        start = (tally.ops, tally.data_free)
        try:
            return run_clip(*args, **kwargs)
        finally:
            in_clip["ops"] += tally.ops - start[0]
            in_clip["data_free"] += tally.data_free - start[1]

    def run():
        return processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[size])

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        run()  # lazy initialisations (cached position codes and resampling taps) out of the count
        core._run_clip = counted_clip
        try:
            with DispatchTally() as tally:
                run()
        finally:
            del core._run_clip
    if not detail:
        return tally.ops
    return {"ops": tally.ops, "launching": tally.ops - tally.data_free, "after_clip": tally.ops - in_clip["ops"],
            "after_clip_launching": tally.ops - tally.data_free - in_clip["ops"] + in_clip["data_free"]}


def count_training_ops(batch: int = 8, crop: int = 640) -> dict:
    """ATen ops dispatched by one training step (bf16 autocast forward with labels and its loss, backward, AdamW)
    on a batch of `crop` px crops holding ~12 classes each, as in `benchmarks.gpu`'s training figure (decoder
    widths narrowed: the count is the same, the backward on a CPU minutes shorter)."""
    from modeling_mrovseg import MROVSegImageProcessor

    model = op_count_model(narrow_decoder=True).train()
    processor = MROVSegImageProcessor(size={"height": crop, "width": crop})
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8))
    maps = [np.kron(rng.integers(0, 12, (crop // 32, crop // 32)), np.ones((32, 32), np.int64)) + 12 * b
            for b in range(batch)]
    inputs = processor(images, segmentation_maps=maps, return_tensors="pt")
    # fused, as training.train builds it on a GPU
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # lazy initialisations (optimizer state) out of the count
    return {"batch": batch, "crop": crop, "ops": count_dispatched(step)}


def count_loss_ops(batch: int = 8, crop: int = 640, num_classes: int = 150) -> dict:
    """ATen ops dispatched by the training loss (ViT-B/16 defaults: 100 queries, 3 decoder outputs, 12544 points) for
    a batch of `crop` px label maps holding ~12 classes each."""
    from modeling_mrovseg import MROVSegConfig
    from modeling_mrovseg.loss_mrovseg import MROVSegLoss

    names = [f"class {i}" for i in range(num_classes)]
    config = MROVSegConfig.from_preset("vit-b-16", id2label=dict(enumerate(names)),
                                       label2id={n: i for i, n in enumerate(names)})
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 12, (batch, crop // 32, crop // 32), generator=generator).repeat_interleave(
        32, 1).repeat_interleave(32, 2) + torch.arange(batch)[:, None, None] * 12 % (num_classes - 12)
    side = crop // config.patch_size * 2 ** len(config.feature_layers)
    queries = config.num_queries
    outputs = [(torch.randn(batch, queries, num_classes + 1, generator=generator),
                torch.randn(batch, queries, side, side, generator=generator)) for _ in range(config.num_decoder_layers)]
    auxiliary = [{"class_queries_logits": c, "masks_queries_logits": m} for c, m in outputs[1:]]
    ops = count_dispatched(lambda: MROVSegLoss(config)(*outputs[0], labels, auxiliary, torch.arange(batch)))
    return {"batch": batch, "crop": crop, "decoder_outputs": len(outputs), "ops": ops}


def aten_op_counts() -> list[dict]:
    rows = []
    for size in [(640, 640), (2048, 2048)]:
        row = {"size": list(size)}
        for name, kwargs in (("default", {}), ("bf16_weights", {"bf16_weights": True})):
            row[name] = count_aten_ops(size, **kwargs)
        one_call = count_aten_ops(size, bf16_weights=True, slice_batch_size=None, detail=True)
        row["bf16_weights_one_clip_call"] = one_call.pop("ops")
        row["bf16_weights_one_clip_call_split"] = one_call
        rows.append(row)
        print(row, flush=True)
    rows.append({"loss": count_loss_ops()})
    print(rows[-1], flush=True)
    rows.append({"training_step": count_training_ops()})
    print(rows[-1], flush=True)
    return rows


def matmul_rate(runs: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times)


# ---------------------------------------------------------------- metric, processor, training
def metric_benchmark(num_maps: int = 500, size: int = 512, num_labels: int = 150) -> dict:
    import importlib.util
    from pathlib import Path

    from modeling_mrovseg import MEAN_IOU

    spec = importlib.util.spec_from_file_location("mean_iou", Path(MEAN_IOU) / "mean_iou.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, num_labels, (size, size), dtype=np.int64) for _ in range(num_maps)]
    labels = [rng.integers(0, num_labels, (size, size)).astype(np.uint8) for _ in range(num_maps)]
    for label in labels[::7]:
        label[:32] = 255

    def numpy_per_image():
        total = np.zeros((4, num_labels))
        for pred, label in zip(preds, labels):
            mask = label != 255
            p, lab = pred[mask], label[mask]
            inter = p[p == lab]
            hists = [np.histogram(x, bins=num_labels, range=(0, num_labels - 1))[0] for x in (inter, p, lab)]
            total += np.stack([hists[0], hists[1], hists[2], hists[1] + hists[2] - hists[0]])
        return total[0] / total[3]

    def streaming():
        metric = module.MeanIoU()
        for start in range(0, num_maps, 16):  # as an evaluation loop would feed it
            metric.add_batch(predictions=preds[start : start + 16], references=labels[start : start + 16])
        return metric.compute(num_labels=num_labels, ignore_index=255)["per_category_iou"]

    start = time.perf_counter()
    reference = numpy_per_image()
    numpy_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = streaming()
    ours_seconds = time.perf_counter() - start
    return {"maps": num_maps, "size": size, "numpy_seconds": numpy_seconds, "streaming_seconds": ours_seconds,
            "speedup": numpy_seconds / ours_seconds, "identical": bool(np.array_equal(reference, ours))}


def processor_benchmark(runs: int = 5) -> dict:
    processor, image = prepare((1024, 2048))
    processor(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        processor(image, return_tensors="pt")
        times.append(time.perf_counter() - start)
    return {"size": [1024, 2048], "seconds": statistics.median(times), "images_per_second": 1 / statistics.median(times)}


def training_step_benchmark(preset: str, crop: int, runs: int) -> dict:
    from modeling_mrovseg import MROVSegConfig, MROVSegForOpenVocabSegmentation, MROVSegImageProcessor

    names = [f"class {i}" for i in range(20)]
    kwargs = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if preset == "tiny":
        kwargs.update(num_queries=16, hidden_dim=64, num_decoder_heads=4, decoder_ffn_dim=128, train_num_points=2048)
    config = MROVSegConfig.from_preset(preset, **kwargs)
    torch.manual_seed(0)
    model = MROVSegForOpenVocabSegmentation(config).train()
    processor = MROVSegImageProcessor(slice_size=config.slice_size, size={"height": crop, "width": crop})
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (crop, crop, 3), dtype=np.uint8)
    label = rng.integers(0, 20, (crop // 32, crop // 32)).repeat(32, 0).repeat(32, 1)
    batch = processor([image, image], segmentation_maps=[label, label], return_tensors="pt")
    # fused, as training.train builds it on a GPU
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:  # the first step is the warm-up
            times.append(time.perf_counter() - start)
    return {"preset": preset, "batch": 2, "crop": crop, "seconds_per_step": statistics.median(times)}


def smooth_outputs(size, num_classes: int = 150, queries: int = 100, device="cpu", dtype=torch.float32):
    """Model outputs with segments, as a trained model gives (a random-weight model's maps are one class everywhere,
    so its post-processing never blends a boundary): masks at half the image side (ViT-B/16's decoder) smoothly
    upsampled from a grid 32x coarser (4 x 4 at least): 5-7% of the mask cells lie at a boundary (RESULTS.md)."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(0)
    low = (size[0] // 2, size[1] // 2)
    coarse = torch.randn(1, queries, max(4, low[0] // 32), max(4, low[1] // 32), generator=generator) * 4
    class_logits = torch.randn(1, queries, num_classes + 1, generator=generator) * 3
    masks = F.interpolate(coarse, size=low, mode="bilinear")
    return SimpleNamespace(class_queries_logits=class_logits.to(device, dtype),
                           masks_queries_logits=masks.to(device, dtype))


def boundary_cell_fraction(score: torch.Tensor) -> float:
    """Share of an image's (C, h, w) mask-resolution cells whose corners disagree on the winning class: the cells
    post-processing blends all classes in."""
    from modeling_mrovseg.image_processing_mrovseg import uniform_cells

    return 1 - float(uniform_cells(score.argmax(dim=0)).float().mean())


def postprocess_benchmark(sizes=((640, 640), (2048, 2048)), num_classes: int = 150, queries: int = 100,
                          runs: int = 3) -> list[dict]:
    """Post-processing alone at ViT-B/16's mask resolution (half the image side), 150 classes: labels from the
    low-resolution winners with all classes blended at segment boundaries only (the default) against the argmax of
    every class map resampled to full size, side by side on the same scores. The masks are smooth blobs (segments
    with boundaries, as a trained model gives; a random-weight model's maps are one class everywhere)."""
    from benchmarks.export import median_seconds
    from modeling_mrovseg.image_processing_mrovseg import label_scores, semantic_scores

    rows = []
    for size in sizes:
        outputs = smooth_outputs(size, num_classes, queries)
        score = semantic_scores(outputs)[0]
        # the full resampling is the path that keeps every class map (the labels' work, and the maps returned)
        ours = label_scores(score, None, size).segmentation
        full = label_scores(score, None, size, keep_scores=True).segmentation
        rows.append({"size": list(size), "classes": num_classes, "queries": queries,
                     "scores_seconds": median_seconds(lambda: semantic_scores(outputs), runs),
                     "corners_seconds": median_seconds(lambda: label_scores(score, None, size), runs),
                     "full_resampling_seconds": median_seconds(
                         lambda: label_scores(score, None, size, keep_scores=True), runs),
                     "identical_fraction": float((ours == full).float().mean()),
                     "traffic_gb": postprocess_traffic(outputs, size),
                     "boundary_cell_fraction": boundary_cell_fraction(score)})
        print(rows[-1], flush=True)
    return rows


def postprocess_traffic(outputs, size) -> dict:
    """GB read and written by the default post-processing's two steps (`DispatchTally`) on the outputs in bfloat16,
    as the GPU recipe's model gives them: on a GPU these steps are bound by memory bandwidth."""
    from modeling_mrovseg.image_processing_mrovseg import label_scores, semantic_scores

    half = type(outputs)(**{name: value.bfloat16() for name, value in vars(outputs).items()})
    with DispatchTally() as scores_tally:
        score = semantic_scores(half)[0]
    with DispatchTally() as labels_tally:
        label_scores(score, None, size)
    return {"scores": scores_tally.bytes / 1e9, "labels": labels_tally.bytes / 1e9}


# ---------------------------------------------------------------- orchestration
def in_subprocess(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--child", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, one timed run each")
    parser.add_argument("--only", nargs="+", default=SECTIONS, choices=SECTIONS,
                        help="measure these sections; the others keep their saved figures and dates")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render RESULTS.md from results/performance.json (no measurement)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "variant":
            result = run_variant(rest[0], (int(rest[1]), int(rest[2])), int(rest[3]))
        elif kind == "training":
            result = training_step_benchmark(rest[0], int(rest[1]), int(rest[2]))
        else:
            raise ValueError(kind)
        print(json.dumps(result))
        return result

    if args.report_only:
        saved = json.loads((Path(__file__).resolve().parent / "results" / "performance.json").read_text())
        if "aten" in args.only and "aten" not in saved:
            saved["aten"] = aten_op_counts()
        write_report(saved)
        return saved
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    from benchmarks.results_file import machine

    saved_path = Path(__file__).resolve().parent / "results" / "performance.json"
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s", flush=True)
    report = {"command": command, "machine": machine(), "matmul_flops_per_second": rate}
    if set(args.only) != set(SECTIONS) and saved_path.exists():  # a partial run updates the saved report
        report = json.loads(saved_path.read_text())
        report.setdefault("measured", {}).update({section: machine() for section in args.only})
        if "latency" in args.only:
            report["matmul_flops_per_second"] = rate
    sizes = QUICK_SIZES if args.quick else SIZES
    if "latency" in args.only:
        rows = []
        for size in sizes:
            runs = 1 if args.quick or size[0] * size[1] >= 2048 * 2048 else 3
            row = {"size": size}
            for variant in VARIANTS:
                flops = count_flops(variant, size)
                if variant == "full_resolution_clip" and size[0] * size[1] > FULL_RES_MAX_PIXELS:
                    row[variant] = {"flops": flops, "seconds": None, "peak_rss_gb": None}
                    continue
                measured = in_subprocess("variant", variant, str(size[0]), str(size[1]), str(runs))
                row[variant] = {"flops": flops, "seconds": measured["seconds"], "peak_rss_gb": measured["peak_rss_gb"]}
                print(size, variant, row[variant], flush=True)
            rows.append(row)
        report["latency"] = rows
    if "metric" in args.only:
        report["metric"] = metric_benchmark(100 if args.quick else 500)
        print(report["metric"], flush=True)
    if "processor" in args.only:
        report["processor"] = processor_benchmark()
        print(report["processor"], flush=True)
    if "training" in args.only:
        report["training"] = [in_subprocess("training", "tiny", "256", "3"),
                              in_subprocess("training", "vit-b-16", "448" if args.quick else "640", "2")]
        print(report["training"], flush=True)
    if "aten" in args.only:
        report["aten"] = aten_op_counts()
    if "postprocess" in args.only:
        report["postprocess"] = postprocess_benchmark()
    write_report(report)
    return report


def stamp(report: dict, section: str) -> str:
    """Where a section was measured apart from the rest (`--only`), say when and on what."""
    measured = report.get("measured", {}).get(section)
    if not measured or measured == report.get("machine"):
        return ""
    return f" (measured apart: `--only {section}` on {measured})"


def write_report(report: dict) -> None:
    from benchmarks.results_file import machine, write_section

    rate = report["matmul_flops_per_second"]
    # re-rendered reports (--report-only) keep the machine and date of the measurement
    measured_on = report.get("machine") or machine()
    lines = ["## Performance (CPU)", "", f"`{report['command']}` on {measured_on}; ViT-B/16 shapes, random weights, "
             f"fp32, SDPA, 20 classes, `slice_batch_size=16`. Measured fp32 2048 x 2048 matmul rate: "
             f"{rate / 1e9:.0f} GFLOP/s. Times are medians after a warm-up; each (variant, size) ran in its own "
             "process (peak RSS is that process's, model included)."]
    if "latency" in report:
        lines += ["", "| image (H x W) | MROVSeg s | CLIP floor s | overhead after CLIP | single-res s | "
                      "full-res CLIP s | speed-up over full-res, time | FLOPs MROVSeg / floor / full-res (T) | "
                      "speed-up over full-res, FLOPs (of the ideal floor ratio) "
                      "| MROVSeg GFLOP/s (% of matmul) | peak RSS MROVSeg / full-res GB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["latency"]:
            ours, single, full, floor = (row[v] for v in VARIANTS)
            ideal = full["flops"] / floor["flops"]
            achieved = full["flops"] / ours["flops"]
            full_s = f"{full['seconds']:.1f}" if full["seconds"] else "not run (quadratic)"
            time_ratio = f"{full['seconds'] / ours['seconds']:.2f}x" if full["seconds"] else "-"
            full_mem = f"{full['peak_rss_gb']:.1f}" if full["peak_rss_gb"] else "-"
            lines.append(
                f"| {row['size'][0]} x {row['size'][1]} | {ours['seconds']:.1f} | {floor['seconds']:.1f} | "
                f"{100 * (ours['seconds'] / floor['seconds'] - 1):+.0f}% | {single['seconds']:.2f} | {full_s} | "
                f"{time_ratio} | "
                f"{ours['flops'] / 1e12:.2f} / {floor['flops'] / 1e12:.2f} / {full['flops'] / 1e12:.2f} | "
                f"{achieved:.2f}x of {ideal:.2f}x ({achieved / ideal:.2f} of ideal) | "
                f"{ours['flops'] / ours['seconds'] / 1e9:.0f} ({100 * ours['flops'] / ours['seconds'] / rate:.0f}%) | "
                f"{ours['peak_rss_gb']:.1f} / {full_mem} |")
        small = report["latency"][0]
        large = next((r for r in report["latency"] if tuple(r["size"]) == (2048, 2048)), report["latency"][-1])
        scale = large["mrovseg"]["seconds"] / small["mrovseg"]["seconds"]
        pixels = (large["size"][0] * large["size"][1]) / (small["size"][0] * small["size"][1])
        lines += ["", f"Scaling: time({large['size'][0]} x {large['size'][1]}) / time({small['size'][0]} x "
                      f"{small['size'][1]}) = {scale:.1f} for {pixels:.0f}x the pixels."]
    if "aten" in report:
        lines += ["", "ATen ops dispatched by one inference forward + post-processing (ViT-B/16 structure, 150 classes, "
                      "bf16 autocast; a CPU proxy for GPU kernel launches; `count_aten_ops`; targets 400 at 640^2 and "
                      f"800 at 2048^2){stamp(report, 'aten')}:", "",
                  "| image | fp32 weights, slice_batch_size 32 (default) | bf16 weights | bf16 weights, one CLIP call "
                  "| of which launch a kernel | of which after CLIP's passes (launching) |",
                  "|---|---|---|---|---|---|"]
        for row in report["aten"]:
            if "size" in row:
                split = row.get("bf16_weights_one_clip_call_split")
                tail = (f"{split['launching']} | {split['after_clip']} ({split['after_clip_launching']})" if split
                        else "- | -")
                lines.append(f"| {row['size'][0]} x {row['size'][1]} | {row['default']} | {row['bf16_weights']} | "
                             f"{row['bf16_weights_one_clip_call']} | {tail} |")
        lines += ["", "Ops that move no data (views, no-op casts: `moves_no_data`) launch no GPU kernel but still cost "
                      "the host a dispatch; composite ops (einsum, attention) may launch several kernels on a GPU."]
        for row in report["aten"]:
            if "loss" in row:
                loss = row["loss"]
                lines += ["", f"The training loss (`count_loss_ops`: batch {loss['batch']}, {loss['crop']} px crops, "
                              f"{loss['decoder_outputs']} decoder outputs, 150 classes, ViT-B/16 defaults) dispatches "
                              f"{loss['ops']} ATen ops and reads from the device three times per step whatever the "
                              "batch (tests/test_loss.py): all images and decoder outputs are scored at once, and each "
                              "output's matching costs computed for the whole batch."]
            if "training_step" in row:
                step = row["training_step"]
                lines += ["", f"One training step (`count_training_ops`: batch {step['batch']}, {step['crop']} px "
                              "crops, bf16 autocast forward with the loss, backward, fused AdamW as on a GPU) "
                              f"dispatches {step['ops']} ATen ops."]
        lines += ["", "With weights in bf16 autocast casts almost nothing (the default's extra ops are casts); under "
                      "`torch.compile` the count stops mattering (one graph, fused kernels; see the GPU section)."]
    if "postprocess" in report:
        lines += ["", "Post-processing alone (`postprocess_benchmark`: 100 queries, 150 classes, masks at half the "
                      "image side as ViT-B/16's decoder gives, smooth segments): labels from the low-resolution winners, "
                      "all classes blended at segment boundaries only (the default), against the argmax of every "
                      f"class map resampled to full size, on the same scores{stamp(report, 'postprocess')}:", "",
                  "| image | class scores s | labels, boundary blending s | labels, full resampling s | speed-up | "
                  "identical labels | boundary cells | GB read + written (bf16 outputs): scores + labels |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in report["postprocess"]:
            lines.append(f"| {row['size'][0]} x {row['size'][1]} | {row['scores_seconds']:.3f} | "
                         f"{row['corners_seconds']:.3f} | {row['full_resampling_seconds']:.3f} | "
                         f"{row['full_resampling_seconds'] / row['corners_seconds']:.1f}x | "
                         f"{100 * row['identical_fraction']:.4f}% | {100 * row['boundary_cell_fraction']:.1f}% | "
                         + (f"{row['traffic_gb']['scores']:.2f} + {row['traffic_gb']['labels']:.2f} |"
                            if "traffic_gb" in row else "- |"))
    if "metric" in report:
        m = report["metric"]
        lines += ["", f"Metric: {m['maps']} maps of {m['size']} x {m['size']}, 150 classes: per-image numpy "
                      f"{m['numpy_seconds']:.2f} s, streaming histogram {m['streaming_seconds']:.2f} s: "
                      f"**{m['speedup']:.1f}x**, identical values: {m['identical']}."]
    if "processor" in report:
        p = report["processor"]
        lines += ["", f"Image processor at 1024 x 2048 (50 windows + global view): {p['seconds'] * 1000:.0f} ms "
                      f"per image ({p['images_per_second']:.1f} images/s)."]
    if "training" in report:
        lines += ["", "Training step (batch 2, forward + backward + AdamW): " + "; ".join(
            f"{t['preset']} at {t['crop']} px crops {t['seconds_per_step']:.2f} s" for t in report["training"]) + "."]
    write_section("performance", "\n".join(lines))
    from pathlib import Path

    (Path(__file__).resolve().parent / "results").mkdir(exist_ok=True)
    (Path(__file__).resolve().parent / "results" / "performance.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
