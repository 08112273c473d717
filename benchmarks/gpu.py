"""GPU benchmark: latency, memory, throughput, bf16 agreement and an accelerate training smoke run, in one run.

    python -m benchmarks.gpu            # on a CUDA device: the figures the targets need; writes "gpu_latest"
    python -m benchmarks.gpu --studies  # and the side-by-side studies (about twice as long)
    python -m benchmarks.gpu --sections latency --sizes 2048x2048 --compiled-sizes 2048x2048   # a part of it
    python -m benchmarks.gpu --smoke [--studies]   # the same code on the CPU with the tiny config (CI runs both)

The default run is sized for the issue's five minutes on an H100: each compiled input size is a build of tens of
seconds, so it compiles the two target sizes only, and the report ends with each section's seconds. Every figure is
measured in this run on this card, side by side:
1. latency (ms, median of CUDA-event-timed runs, post-processing of 150 classes included) and peak memory of MROVSeg,
   the CLIP passes alone (the floor), full-resolution CLIP feeding the same decoder (`high_res_encoding="full_image"`)
   and the single-resolution ablation, 640^2 to 4096^2, bf16 autocast; MROVSeg also compiled with CUDA graphs
   (`mode="reduce-overhead"`, the README's recipe and the pipeline's fastest) at 640^2 and 2048^2;
   `--studies`: every size compiled, `torch.compile`'s default mode beside the graphs, eager with `cudnn.benchmark`
   and with two candidates (channels-last stitching; the 2-D LayerNorms' maps in bf16);
2. post-processing alone at 2048^2, on the model's outputs and on outputs with segments (`--studies`: the fused
   `compiled=True` path, every class map resampled, the score contraction, both score layouts and a candidate,
   contiguous boundary class vectors), and batch-8 throughput at 640^2, eager (`--studies`: compiled too);
3. training-step throughput and peak memory (AdamW, clip 0.01, bf16 autocast, 640 crops) for ViT-B/16 (batch 8, eager
   and with compiled regions, whose first step is their build; `--studies`: the whole forward compiled, and
   transformers' QuickGELU in CLIP) and ViT-L/14 (batch 4);
4. bf16 autocast against fp32 on the same input (relative error of the logits, argmax agreement, also on the pixels
   whose fp32 winner leads by more than bf16 can move: random weights often make every pixel a near tie);
5. a 60-step `accelerate launch --mixed_precision bf16` training run and `training.evaluate` on synthetic data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.memory import plain_quick_gelu
from modeling_mrovseg.pipelines import uses_cuda_graphs

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 640), (1024, 2048), (2048, 2048), (4096, 4096)]
SECTIONS = ["bf16_agreement", "latency", "postprocess_and_batch", "training", "training_smoke"]
VARIANTS = ["mrovseg", "mrovseg_bf16", "clip_floor", "full_resolution_clip", "single_resolution"]


def image_size(text: str) -> tuple[int, int]:
    """"640x480" -> (640, 480): an argparse type."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 640x640, got {text!r}") from None
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def build(preset: str, num_labels: int, device, dtype=None, **overrides):
    from modeling_mrovseg import MROVSegConfig, MROVSegForOpenVocabSegmentation

    names = [f"class {i}" for i in range(num_labels)]
    config = MROVSegConfig.from_preset(preset, id2label=dict(enumerate(names)),
                                       label2id={n: i for i, n in enumerate(names)}, **overrides)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a ViT-B/16's random init takes seconds on a CPU
        model = MROVSegForOpenVocabSegmentation(config).to(device).eval()  # .to: any tensor made on the host
    return model.to(dtype) if dtype is not None else model


def timed(fn, device, runs: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn()` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def inputs_for(model, size, device, batch: int = 1):
    from modeling_mrovseg import MROVSegImageProcessor

    processor = MROVSegImageProcessor.from_model_config(model.config, size={"height": size[0], "width": size[1]})
    image = np.random.default_rng(0).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    return processor, processor([image] * batch, return_pixel_mask=True, return_tensors="pt").to(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else None


def fast_model(args, device):
    """The GPU inference recipe, built once per run: weights in bf16 (autocast then casts almost nothing), every
    slice in one CLIP call."""
    if args.fast is None:
        args.fast = build(args.preset, args.num_labels, device, dtype=torch.bfloat16, slice_batch_size=None)
    return args.fast


def compiled_forward(args, device, mode: str | None = None):
    """`fast_model` compiled for one input shape at a time (`dynamic=False`: each new shape compiles anew) in `mode`
    (None: the run's own, CUDA graphs on a GPU as in the README's recipe). One per mode per run, so the latency
    table and the batch of 8 share its builds. With CUDA graphs each call begins a graph step, as the zero-shot
    pipeline's do: a call's outputs may overwrite the last one's."""
    mode = mode or args.compile_mode
    cache = args.compiled
    if mode not in cache:
        options = {} if mode == "default" else {"mode": mode}
        compiled = torch.compile(fast_model(args, device), dynamic=False, backend=args.compile_backend, **options)

        graphs = uses_cuda_graphs(mode)

        def forward(**inputs):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(**inputs)

        cache[mode] = forward
    return cache[mode]


@contextlib.contextmanager
def cudnn_benchmark():
    """cuDNN times its algorithms for each new convolution shape and keeps the fastest, while inside."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def channels_last_stitching():
    """While inside, the model stitches windows without overlap into channels-last maps, keeping CLIP's token-major
    layout (the library's `stitch_windows` gives channels-first maps): the same values, which the adapters'
    convolutions and the masked attention then read in another layout. A candidate measured side by side; it stays out
    of the library while training with it is unexplained (the main job's seed 0 fell to 70.3% mIoU, RESULTS.md)."""
    import modeling_mrovseg.modeling_mrovseg as modeling

    original = modeling.stitch_windows

    def stitch(windows: torch.Tensor, grid) -> torch.Tensor:
        if grid.stride != grid.window:
            return original(windows, grid)
        batch, _, channels, window, _ = windows.shape
        tiles = windows.reshape(batch, grid.rows, grid.cols, channels, window, window)
        return tiles.permute(0, 1, 4, 2, 5, 3).reshape(batch, grid.height, grid.width, channels).permute(0, 3, 1, 2)

    modeling.stitch_windows = stitch
    try:
        yield
    finally:
        modeling.stitch_windows = original


@contextlib.contextmanager
def map_norms_in_bf16():
    """While inside, the 2-D LayerNorms (the adapters' projections, the pixel decoder's stages) turn bf16 maps into
    bf16 maps under autocast (the kernel still accumulates their statistics in float32), where CUDA's autocast gives
    float32 maps that the GELU, upsampling and concatenation after them then carry in float32 (on an H200 the pixel
    decoder's three norms took 2.5 of its 5.3 ms at 2048^2, its float32 upsampling 1.5; run C). A candidate measured
    side by side: it moves bf16 training's rounding too."""
    import torch.nn.functional as F

    from modeling_mrovseg.layers import MROVSegLayerNorm2d

    original = MROVSegLayerNorm2d.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return original(self, x)
        with torch.autocast(x.device.type, enabled=False):
            normed = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight.to(x.dtype), self.bias.to(x.dtype),
                                  self.eps)
        return normed.permute(0, 3, 1, 2)

    MROVSegLayerNorm2d.forward = forward
    try:
        yield
    finally:
        MROVSegLayerNorm2d.forward = original


@contextlib.contextmanager
def contiguous_class_vectors():
    """While inside, boundary blending multiplies a contiguous copy of the class vectors it gathered from class-major
    scores (the library's `class_vectors` hands the matrix product a strided view, which an H200 ran in a generic GEMM
    kernel, 0.68 ms at 2048^2 with segments, against 0.40 ms for contiguous vectors in MAGMA's batched one). A
    candidate measured side by side; same values."""
    import modeling_mrovseg.image_processing_mrovseg as processing

    original = processing.class_vectors
    processing.class_vectors = lambda flat, index: original(flat, index).contiguous()
    try:
        yield
    finally:
        processing.class_vectors = original


# candidates kept out of the library, timed eager in bf16 at every size with their labels checked against eager's:
# variant -> (the setting that patches it in, what the report calls it)
CANDIDATES = {"mrovseg_channels_last_stitching": (channels_last_stitching, "channels-last stitching"),
              "mrovseg_bf16_map_norms": (map_norms_in_bf16, "the 2-D LayerNorms' maps in bf16")}


# compiled rows: variant -> torch.compile mode
COMPILED = {"mrovseg_compiled": "default", "mrovseg_cuda_graphs": "reduce-overhead"}


def compiled_variants(args) -> list[str]:
    """The compiled rows at each compiled size: the run's own mode (CUDA graphs on a GPU), and with `--studies` on a
    GPU the default mode beside it."""
    own = "mrovseg_cuda_graphs" if uses_cuda_graphs(args.compile_mode) else "mrovseg_compiled"
    return [own] + (["mrovseg_compiled"] if args.studies and own != "mrovseg_compiled" else [])


def first_call_s(fn, device) -> float:
    """Seconds of one call, synchronised: a compiled forward's first call is its build."""
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def latency_table(args, device) -> list[dict]:
    rows = []
    base = build(args.preset, args.num_labels, device)
    bf16 = fast_model(args, device)
    models = {"mrovseg": base, "mrovseg_bf16": bf16, "clip_floor": bf16,
              "full_resolution_clip": build(args.preset, args.num_labels, device, high_res_encoding="full_image"),
              "single_resolution": build(args.preset, args.num_labels, device, use_high_res=False)}
    # `--studies`, side by side with the rows above: the candidates kept out of the library, and cuDNN's own
    # algorithm search (`cudnn.benchmark`) for the convolutions (no gain at any size on an H200, run C), eager
    studies = []
    if args.studies:
        studies = list(CANDIDATES) + (["mrovseg_cudnn_benchmark"] if device.type == "cuda" else [])
    for size in args.sizes:
        processor, inputs = inputs_for(base, size, device)
        compiled_here = compiled_variants(args) if tuple(size) in args.compiled_sizes else []
        for variant in VARIANTS + studies + compiled_here:
            if variant == "full_resolution_clip" and size[0] * size[1] > args.full_res_max_pixels:
                continue
            model = models.get(variant, bf16)
            forward = compiled_forward(args, device, COMPILED[variant]) if variant in COMPILED else model

            def step(model=model, variant=variant, forward=forward):
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                    if variant == "clip_floor":
                        images = torch.cat([inputs["pixel_values"], inputs["pixel_values_slices"].flatten(0, 1)])
                        return model.mrovseg._run_clip(images, [model.config.vision_config.num_hidden_layers - 1])
                    outputs = forward(**inputs)
                    # the default post-processing after the compiled forward too: its fused `compiled=True` path
                    # was 3.5x slower on an H200 (postprocess_and_batch times both with --studies)
                    return processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0]

            reset_peak(device)
            setting = cudnn_benchmark if variant == "mrovseg_cudnn_benchmark" else CANDIDATES.get(
                variant, (contextlib.nullcontext,))[0]
            # labels compared with eager bf16's: a compiler bug shows here first (CPU inductor's fold did); the
            # candidates give the same values, rounded in another order or place
            checked = variant in COMPILED or variant in CANDIDATES
            row = {"variant": variant, "size": list(size)}
            try:
                with setting():
                    if variant in COMPILED:
                        row["first_call_s"] = first_call_s(step, device)
                    row["ms"] = timed(step, device, args.runs, warmup=2 if variant in COMPILED else 1)
                    row["peak_gb"] = peak_gb(device)
                    labels = step() if checked or variant == "mrovseg_bf16" else None
            except Exception as error:  # a compiler failure is a result to report, not the end of the run
                if variant not in COMPILED:
                    raise
                print(json.dumps({**row, "error": repr(error)[:500]}), flush=True)
                continue
            rows.append(row)
            if variant == "mrovseg_bf16":
                eager_labels = labels
            elif checked:
                row["labels_agree_with_eager"] = float((labels == eager_labels).float().mean())
            print(json.dumps(row), flush=True)
    return rows


def postprocess_and_batch(args, device) -> dict:
    """Post-processing alone at the third size (2048^2 by default), on the model's outputs and on outputs with
    segments; batch-8 throughput at the first size, eager. `--studies`: the labellings and layouts side by side, and
    batch 8 compiled."""
    from benchmarks.run import boundary_cell_fraction, smooth_outputs
    from modeling_mrovseg.image_processing_mrovseg import semantic_scores

    model = fast_model(args, device)
    size = args.sizes[min(2, len(args.sizes) - 1)]
    processor, inputs = inputs_for(model, size, device)
    result = {"postprocess_size": list(size)}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        outputs = model(**inputs)
        result["postprocess_ms"] = timed(lambda: processor.post_process_semantic_segmentation(
            outputs, target_sizes=[size]), device, args.runs)
        # a random-weight model's class maps are one class everywhere, so the line above never blends a boundary:
        # outputs with segments too (as a trained model gives)
        smooth = smooth_outputs(size, args.num_labels, model.config.num_queries, device, torch.bfloat16)
        result["smooth_postprocess_ms"] = timed(lambda: processor.post_process_semantic_segmentation(
            smooth, target_sizes=[size]), device, args.runs)
        result["smooth_boundary_cell_fraction"] = boundary_cell_fraction(semantic_scores(smooth)[0])
        if args.studies:
            result.update(postprocess_studies(args, device, processor, outputs, smooth, size))
    processor, batch = inputs_for(model, args.sizes[0], device, batch=8)
    result["batch8_size"] = list(args.sizes[0])
    forwards = [("eager", model)]
    if args.compile and args.studies:  # eager meets the target; compiling batch 8 is one more build (~30 s)
        forwards.append(("compiled", compiled_forward(args, device)))
        result["batch8_compile_mode"] = args.compile_mode
    for name, forward in forwards:

        def batch_step(forward=forward):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                outputs = forward(**batch)
                return processor.post_process_semantic_segmentation(outputs, target_sizes=[args.sizes[0]] * 8)

        try:
            ms = timed(batch_step, device, args.runs, warmup=3)
        except Exception as error:  # see latency_table
            if name == "eager":
                raise
            result["batch8_compiled_error"] = repr(error)[:500]
            continue
        result[f"batch8_{name}_images_per_s"] = 8000 / ms
    return result


def postprocess_studies(args, device, processor, outputs, smooth, size) -> dict:
    """Side by side with the default post-processing: the fused `compiled=True` path, every class map resampled,
    the score contraction alone padded and not, the scores' two layouts and contiguous boundary class vectors."""
    from modeling_mrovseg.image_processing_mrovseg import label_scores, semantic_scores

    post = processor.post_process_semantic_segmentation
    result = {}
    if args.compile:
        result["postprocess_compiled_ms"] = timed(lambda: post(outputs, target_sizes=[size], compiled=True), device,
                                                  args.runs, warmup=3)
    # the labelling before boundary blending: every class map resampled to full size, then argmax
    result["postprocess_full_resampling_ms"] = timed(lambda: post(
        outputs, target_sizes=[size], return_segmentation_scores=True), device, args.runs)
    result["smooth_postprocess_full_resampling_ms"] = timed(lambda: post(
        smooth, target_sizes=[size], return_segmentation_scores=True), device, args.runs)
    # the score contraction alone: class rows of C + 1 floats (the void column sliced off), as before
    # semantic_scores padded them to a multiple of 8, and padded
    with torch.autocast(device.type, enabled=False):
        masks = outputs.masks_queries_logits.float().sigmoid().flatten(2).transpose(1, 2)
        probs = outputs.class_queries_logits.float().softmax(dim=-1)[..., :-1]
        padded = torch.nn.functional.pad(probs, (0, -probs.shape[-1] % 8))
        result["contraction_ms"] = {
            f"rows_of_{probs.shape[-1] + 1}": timed(lambda: torch.bmm(masks, probs), device, args.runs),
            f"padded_to_{padded.shape[-1]}": timed(lambda: torch.bmm(masks, padded), device, args.runs)}
    with contiguous_class_vectors():
        result["smooth_postprocess_contiguous_vectors_ms"] = timed(lambda: post(smooth, target_sizes=[size]), device,
                                                                   args.runs)
        contiguous_labels = post(smooth, target_sizes=[size])[0]
    result["smooth_contiguous_vectors_labels_agree"] = float(
        (contiguous_labels == post(smooth, target_sizes=[size])[0]).float().mean())
    # the scores' layout: class-major (the GPU default) and pixel-major (the CPU's)
    result["smooth_postprocess_layout_ms"] = {
        name: timed(lambda major=major: label_scores(semantic_scores(smooth, class_major=major)[0], None, size),
                    device, args.runs) for name, major in (("class_major", True), ("pixel_major", False))}
    return result


def release_inference(args, device) -> None:
    """Drop the inference sections' bf16 model and compiled forwards (with their CUDA graphs' memory pools), so a
    training step's peak memory counts the training step only."""
    import gc

    args.fast, args.compiled = None, {}
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training_throughput(args, device) -> list[dict]:
    from training.data import SegmentationAugment
    from training.train import adamw

    release_inference(args, device)
    rows = []
    for preset_index, (preset, batch_size) in enumerate(args.train_presets):
        model = build(preset, args.num_labels, device).train()
        crop = args.crop
        from modeling_mrovseg import MROVSegImageProcessor

        processor = MROVSegImageProcessor.from_model_config(model.config)
        rng = np.random.default_rng(0)
        augment = SegmentationAugment(crop_size=crop)
        images, labels = [], []
        for i in range(batch_size):
            image, label = augment(rng.integers(0, 256, (crop, crop, 3), dtype=np.uint8),
                                   rng.integers(0, args.num_labels, (crop, crop)), np.random.default_rng(i))
            images.append(image)
            labels.append(label)
        batch = processor(images, segmentation_maps=labels, do_resize=False, return_pixel_mask=True,
                          return_tensors="pt").to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, 1e-4, 1e-4, device)  # as training.train builds it
        seeds = torch.arange(batch_size, device=device)
        # the first preset also as `training.train --compile regional` runs it: CLIP's layers and the decoders
        # compiled in place, one build per block shape (the loss's matching stays eager: scipy on the host); with
        # `--studies` also `--compile` (the whole forward in one graph: about three times the build)
        variants = ["eager"]
        if preset_index == 0 and args.studies:  # side by side: transformers' QuickGELU in CLIP (keeps its sigmoid)
            variants.append("eager_plain_quick_gelu")
        if (args.compile or args.smoke) and preset_index == 0:  # the smoke run traces them (aot_eager)
            # the whole forward first: compiling the regions changes `model` in place
            variants += ["compiled", "compiled_regions"] if args.studies else ["compiled_regions"]
        for name in variants:
            activation = plain_quick_gelu(model) if name == "eager_plain_quick_gelu" else contextlib.nullcontext()
            reset_peak(device)
            row = {"preset": preset, "batch": batch_size, "crop": crop, "variant": name}
            try:
                forward = compiled_training_model(model, name, args.compile_backend) if "compiled" in name else model
                step = training_step(forward, batch, seeds, params, optimizer, device)
                if "compiled" in name:
                    row["first_call_s"] = first_call_s(step, device)  # the build
                with activation:
                    ms = timed(step, device, max(2, args.runs // 2), warmup=2)
            except Exception as error:  # a compiler failure is a result to report, not the end of the run
                rows.append({**row, "error": repr(error)[:500]})
                continue
            rows.append({**row, "step_s": ms / 1000, "images_per_s": batch_size * 1000 / ms,
                         "peak_gb": peak_gb(device)})
            print(json.dumps(rows[-1]), flush=True)
        model = optimizer = params = forward = step = None  # released before the next preset builds its model
    return rows


def compiled_training_model(model, name: str, backend: str):
    """The model as `training.train --compile` runs it (a compiled wrapper) or `--compile regional` (its regions
    compiled in place)."""
    if name == "compiled":
        return torch.compile(model, backend=backend)
    model.compile_regions(backend=backend)
    return model


def training_step(forward, batch, seeds, params, optimizer, device):
    """One bf16 step as the training loop takes it (AdamW, gradient clipping at 0.01)."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(**batch, loss_seeds=seeds).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


MARGIN = 0.02  # a winner's lead over the runner-up, relative, past bf16's error on the scores (about 1%)


def bf16_agreement(args, device) -> dict:
    model = build(args.preset, args.num_labels, device)
    processor, inputs = inputs_for(model, args.sizes[0], device)
    with torch.inference_mode():
        reference = model(**inputs)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            autocast = model(**inputs)
        pure = build(args.preset, args.num_labels, device, dtype=torch.bfloat16)(
            **{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()})

    size = [args.sizes[0]]
    scored = processor.post_process_semantic_segmentation(reference, target_sizes=size,
                                                          return_segmentation_scores=True)[0]
    best, second = scored.segmentation_scores.topk(2, dim=0).values
    # pixels whose fp32 winner leads by more than bf16 can move a score: a random-weights model's winner often leads
    # by a hair everywhere (0.0284 against 0.0283 on an H200, 2026-11-28), and bf16 then flips every pixel of it
    decided = (best - second) > MARGIN * best
    del scored, best, second

    def compare(other):
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        same = (processor.post_process_semantic_segmentation(other, target_sizes=size)[0]
                == processor.post_process_semantic_segmentation(reference, target_sizes=size)[0])
        return {"class_rel_err": rel(other.class_queries_logits, reference.class_queries_logits),
                "mask_rel_err": rel(other.masks_queries_logits, reference.masks_queries_logits),
                "argmax_agreement": float(same.float().mean()), "decided_share": float(decided.float().mean()),
                "argmax_agreement_decided": float(same[decided].float().mean()) if decided.any() else None}

    return {"autocast_bf16": compare(autocast), "pure_bf16": compare(pure)}


def training_smoke(args) -> dict:
    """60 steps of `accelerate launch --mixed_precision bf16 -m training.train`, then `training.evaluate`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        # the data and the tiny CLIP in this process (two interpreter starts fewer); the run and the evaluation as
        # a user launches them
        from processing.synthetic import write_parquet
        from processing.tiny_clip import build_tiny_clip

        write_parquet(tmp / "data", num_train=16, num_val=4, height=256, width=256)
        build_tiny_clip(str(tmp / "clip"))
        commands = [
            [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", args.smoke_precision, "--dynamo_backend", "no", "-m", "training.train",
             "--model", str(tmp / "clip"), "--dataset", str(tmp / "data"), "--output_dir", str(tmp / "run"),
             "--max_steps", str(args.smoke_steps), "--batch_size", "4", "--crop_size", "128", "--eval_size", "256",
             "--lr", "1e-3", "--max_grad_norm", "1.0", "--checkpointing_steps", str(args.smoke_steps), "--no_progress",
             "--mixed_precision", args.smoke_precision,
             "--config", json.dumps({"num_queries": 8, "hidden_dim": 32, "num_decoder_heads": 4,
                                     "decoder_ffn_dim": 64, "train_num_points": 512})],
            [sys.executable, "-m", "training.evaluate", "--model", str(tmp / "run" / "model"), "--dataset",
             str(tmp / "data"), "--eval_size", "256", "--no_progress", "--output", str(tmp / "eval.json"),
             "--mixed_precision", args.smoke_precision],
        ]
        for command in commands:
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                return {"ok": False, "failed": " ".join(command[:4]), "stderr": result.stderr[-1500:]}
        evaluation = json.loads((tmp / "eval.json").read_text())
        log = [record for line in (tmp / "run" / "log.jsonl").read_text().splitlines()
               if "loss" in (record := json.loads(line))]  # evaluations are logged too
        return {"ok": True, "steps": args.smoke_steps, "seconds": round(time.perf_counter() - started, 1),
                "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"], "mean_iou": evaluation["mean_iou"]}


def report(results: dict) -> str:
    """Markdown of whatever sections `results` holds."""
    post = results.get("compiled_rows_postprocessing", "fused (`compiled=True`)")
    lines = [f"GPU: **{results['device']}**, torch {results['torch']}, bf16 autocast, {results['preset']}, "
             f"{results['num_labels']} classes, batch 1, post-processing included (`python -m benchmarks.gpu"
             f"{' --smoke' if results['smoke'] else ''}`, {results['date']})."]
    if "latency" in results:
        lines += ["", "MROVSeg: fp32 weights under autocast; bf16: weights in bf16, all slices in one CLIP call; "
                  f"compiled: that, `torch.compile(dynamic=False)` (graphs: `mode=\"reduce-overhead\"`, CUDA "
                  f"graphs), then the {post} post-processing. The CLIP floor is the bf16 model's CLIP passes alone.",
                  "", *latency_lines(results["latency"], results["sizes"])]
    if "postprocess_and_batch" in results:
        lines += ["", postprocess_line(results["postprocess_and_batch"], results["num_labels"], post)]
    if "training" in results:
        lines += ["", "| training (AdamW, clip 0.01, bf16) | batch | step s | images/s | peak GB | first step s |",
                  "|---|---|---|---|---|---|"]
        for row in results["training"]:
            label = f"{row['preset']}, {row['crop']} crops" + {
                "compiled": ", compiled (`--compile`)", "compiled_regions": ", compiled regions (`--compile regional`)",
                "eager_plain_quick_gelu": ", transformers' QuickGELU in CLIP"}.get(row.get("variant"), "")
            if "error" in row:
                lines.append(f"| {label} | {row['batch']} | failed: {row['error'][:120]} | | | |")
                continue
            peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.1f}"
            first = f"{row['first_call_s']:.0f}" if "first_call_s" in row else "-"
            lines.append(f"| {label} | {row['batch']} | {row['step_s']:.3f} | {row['images_per_s']:.1f} | {peak} "
                         f"| {first} |")
    if "bf16_agreement" in results:
        def agreement(v: dict) -> str:
            decided = v.get("argmax_agreement_decided")
            return (f"argmax agreement {100 * v['argmax_agreement']:.2f}%" + (
                "" if "decided_share" not in v else
                f" ({100 * v['decided_share']:.1f}% of pixels decided by a {100 * MARGIN:.0f}% lead in fp32"
                + ("" if decided is None else f", {100 * decided:.2f}% of them agree") + ")"))

        lines += ["", "bf16 against fp32 (same input): " + "; ".join(
            f"{name}: class logits {100 * v['class_rel_err']:.2f}%, masks {100 * v['mask_rel_err']:.2f}%, "
            f"{agreement(v)}" for name, v in results["bf16_agreement"].items()) + "."]
    if "training_smoke" in results:
        smoke = results["training_smoke"]
        lines += ["", ("accelerate training smoke run: " + (
            f"{smoke['steps']} steps + evaluation in {smoke['seconds']} s, loss {smoke['first_loss']:.2f} -> "
            f"{smoke['last_loss']:.2f}, mIoU {smoke['mean_iou']:.3f}." if smoke["ok"] else
            f"FAILED at `{smoke['failed']}`: {smoke['stderr'][-300:]}"))]
    if "section_seconds" in results:
        lines += ["", f"Run time {results['seconds']:.0f} s" + (" with `--studies`" if results.get("studies") else "")
                  + ": " + ", ".join(f"{name} {sec:.0f} s" for name, sec in results["section_seconds"].items())
                  + "."]
    return "\n".join(lines)


def latency_lines(rows: list[dict], sizes) -> list[str]:
    lat = {(r["variant"], tuple(r["size"])): r for r in rows}
    fmt = lambda r: f"{r['ms']:.1f}" if r else "n/a"  # noqa: E731
    gb = lambda r: "-" if r is None or r["peak_gb"] is None else f"{r['peak_gb']:.2f}"  # noqa: E731
    lines = ["| image | MROVSeg ms | bf16 ms | compiled ms | CLIP floor ms | after-CLIP overhead (best) "
             "| full-res CLIP ms | speed-up vs full-res (best) | single-res ms | peak GB (fp32 / bf16) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in map(tuple, sizes):
        ours, floor = lat.get(("mrovseg", size)), lat.get(("clip_floor", size))
        half = lat.get(("mrovseg_bf16", size))
        # the faster compiled row: CUDA graphs where timed (the README's recipe), marked
        comp = min((lat[v, size] for v in COMPILED if (v, size) in lat), key=lambda r: r["ms"], default=None)
        full, single = lat.get(("full_resolution_clip", size)), lat.get(("single_resolution", size))
        best = min(r["ms"] for r in (ours, half, comp) if r)
        graphs = " (graphs)" if comp and comp["variant"] == "mrovseg_cuda_graphs" else ""
        lines.append(
            f"| {size[0]} x {size[1]} | {fmt(ours)} | {fmt(half)} | {fmt(comp)}{graphs} | {floor['ms']:.1f} | "
            f"+{100 * (best / floor['ms'] - 1):.0f}% | {fmt(full)} | "
            f"{(full['ms'] / best if full else float('nan')):.2f}x | {fmt(single)} | {gb(ours)} / {gb(half)} |")
    agreement = [f"{r['size'][0]} x {r['size'][1]} {100 * r['labels_agree_with_eager']:.3f}%"
                 + (" (CUDA graphs)" if r["variant"] == "mrovseg_cuda_graphs" else
                    f" (eager, {CANDIDATES[r['variant']][1]})" if r["variant"] in CANDIDATES else "")
                 for r in rows if "labels_agree_with_eager" in r]
    if agreement:
        lines += ["", "Labels equal to eager bf16 labels on: " + ", ".join(agreement) + " of pixels."]
    variants = []
    beside = [("mrovseg_cudnn_benchmark", "bf16 eager with `cudnn.benchmark`", "mrovseg_bf16")]
    beside += [(variant, f"bf16 eager with {words}", "mrovseg_bf16") for variant, (_, words) in CANDIDATES.items()]
    beside += [("mrovseg_cuda_graphs", "compiled with CUDA graphs (`mode=\"reduce-overhead\"`)", "mrovseg_compiled")]
    for size in map(tuple, sizes):
        for variant, name, against in beside:
            row, base = lat.get((variant, size)), lat.get((against, size))
            if row and base:
                variants.append(f"{size[0]} x {size[1]} {name} {row['ms']:.1f} ms against {base['ms']:.1f}")
    if variants:
        lines += ["", "Side by side: " + "; ".join(variants) + "."]
    builds = [f"{r['size'][0]} x {r['size'][1]} {r['first_call_s']:.0f} s"
              + (" (CUDA graphs)" if r["variant"] == "mrovseg_cuda_graphs" else "")
              for r in rows if "first_call_s" in r]
    if builds:
        lines += ["", "First compiled call (the build): " + ", ".join(builds) + "."]
    return lines


def postprocess_line(extra: dict, num_labels: int, compiled_rows_post: str) -> str:
    batch8 = ", ".join(f"{extra[k]:.0f} images/s {k.split('_')[1]}"
                       for k in ("batch8_eager_images_per_s", "batch8_compiled_images_per_s") if k in extra)
    post_compiled = extra.get("postprocess_compiled_ms")
    post_size = " x ".join(map(str, extra["postprocess_size"]))
    text = f"Post-processing alone ({num_labels} classes) at {post_size}: {extra['postprocess_ms']:.1f} ms (default)"
    if post_compiled:
        text += f", {post_compiled:.1f} ms (`compiled=True`, fused full resampling)"
    if "postprocess_full_resampling_ms" in extra:
        text += f", {extra['postprocess_full_resampling_ms']:.1f} ms (every class map resampled, eager)"
    if "smooth_postprocess_ms" in extra:
        text += (f". On outputs with segments (`benchmarks.run.smooth_outputs`, "
                 f"{100 * extra['smooth_boundary_cell_fraction']:.0f}% of the mask cells at a boundary; the model's "
                 f"random weights give one class everywhere): {extra['smooth_postprocess_ms']:.1f} ms (default)")
    if "smooth_postprocess_full_resampling_ms" in extra:
        text += f", {extra['smooth_postprocess_full_resampling_ms']:.1f} ms (every class map resampled)"
    if "contraction_ms" in extra:
        text += "; the score contraction alone: " + ", ".join(
            f"{ms:.2f} ms with {name.replace('_', ' ')}" for name, ms in extra["contraction_ms"].items())
    if "smooth_postprocess_layout_ms" in extra:
        text += "; scores and labels of the outputs with segments with the scores " + ", ".join(
            f"{name.replace('_', '-')} {ms:.2f} ms" for name, ms in extra["smooth_postprocess_layout_ms"].items())
    if "smooth_postprocess_contiguous_vectors_ms" in extra:
        text += (f"; with contiguous boundary class vectors (a candidate) "
                 f"{extra['smooth_postprocess_contiguous_vectors_ms']:.2f} ms against "
                 f"{extra['smooth_postprocess_ms']:.2f} ms, labels equal on "
                 f"{100 * extra['smooth_contiguous_vectors_labels_agree']:.3f}% of pixels")
    mode = {"reduce-overhead": " with CUDA graphs"}.get(extra.get("batch8_compile_mode"), "")
    return (text + f". Batch of 8 at {extra['batch8_size'][0]}^2 (bf16 weights; the compiled forward{mode} then the "
            f"{compiled_rows_post} post-processing): {batch8}.")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU: exercise every path quickly")
    parser.add_argument("--no-write", action="store_true", help="print only, leave benchmarks/RESULTS.md alone")
    parser.add_argument("--out", default=None, help="also write the raw results JSON here")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="measure only these (the report and RESULTS.md section then hold only them)")
    parser.add_argument("--sizes", nargs="+", type=image_size, default=None, help="image sizes, HxW (default: "
                        + ", ".join(f"{h}x{w}" for h, w in SIZES) + ")")
    parser.add_argument("--compiled-sizes", nargs="*", type=image_size, default=None,
                        help="sizes to time compiled too (default: 640x640 2048x2048, with --studies every size; "
                        "each compiles anew)")
    parser.add_argument("--studies", action="store_true",
                        help="also the side-by-side studies: candidates kept out of the library, cudnn.benchmark, "
                        "torch.compile's default mode beside CUDA graphs, every size compiled, post-processing's "
                        "labellings and layouts, transformers' QuickGELU in training (about twice as long)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check of the same code paths")
    if args.smoke:
        args.preset, args.num_labels, args.runs, args.crop = "tiny", 5, 2, 64
        default_sizes = [(64, 64), (96, 160)]
        args.train_presets, args.full_res_max_pixels, args.compile = [("tiny", 2)], 10**9, False
        # one compiled row with its agreement check, traced (aot_eager) but not code-generated: inductor's C++ builds
        # take minutes on a CPU (tests/test_image_processing compiles post-processing's fused path with it)
        default_compiled, args.compile_backend, args.compile_mode = [(64, 64)], "aot_eager", "default"
        args.smoke_steps, args.smoke_precision = 4, "no"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        args.preset, args.num_labels, args.runs, args.crop = "vit-b-16", 150, 10, 640
        default_sizes = SIZES
        args.train_presets, args.full_res_max_pixels = [("vit-b-16", 8), ("vit-l-14", 4)], 4096 * 4096
        args.compile, args.smoke_steps, args.smoke_precision = not args.no_compile, 60, "bf16"
        # the sizes of the 640^2 latency and the 2048^2 overhead targets; each compiled size costs a build (about
        # 20 s on an H200); the studies compile every size
        default_compiled = (SIZES if args.studies else [(640, 640), (2048, 2048)]) if args.compile else []
        # CUDA graphs: the README's recipe and the pipeline's fastest (3.6 against 7.8 ms at 640^2, run C)
        args.compile_backend, args.compile_mode = "inductor", "reduce-overhead"
    args.fast, args.compiled = None, {}  # built on first use (fast_model, compiled_forward)
    args.sizes = args.sizes or default_sizes
    args.compiled_sizes = default_compiled if args.compiled_sizes is None else args.compiled_sizes
    from datetime import datetime, timezone

    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (smoke)",
               "torch": torch.__version__, "preset": args.preset, "num_labels": args.num_labels,
               "sizes": [list(s) for s in args.sizes], "smoke": args.smoke, "compiled_rows_postprocessing": "default",
               "date": f"{datetime.now(timezone.utc):%Y-%m-%d}"}
    started = time.perf_counter()
    sections = {"bf16_agreement": bf16_agreement, "latency": latency_table,
                "postprocess_and_batch": postprocess_and_batch, "training": training_throughput,
                "training_smoke": lambda args, device: training_smoke(args)}
    results["studies"], results["section_seconds"] = args.studies, {}
    for name in args.sections:
        begun = time.perf_counter()
        results[name] = sections[name](args, device)
        results["section_seconds"][name] = round(time.perf_counter() - begun, 1)
        results["seconds"] = round(time.perf_counter() - started, 1)
        if args.out:  # after every section: a run cut off by a time limit keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"{name} done at {results['seconds']} s", flush=True)
    text = report(results)
    print(text)
    if not args.no_write and not args.smoke:
        from benchmarks.results_file import write_section

        # its own section: the "gpu" one is written by hand around the runs (A to D) and would be replaced
        write_section("gpu_latest", "## GPU, the latest `python -m benchmarks.gpu`\n\n" + text)
    return results


if __name__ == "__main__":
    main()
