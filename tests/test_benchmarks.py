"""The GPU benchmark's code paths, run on the CPU with the tiny config (`--smoke`), so a GPU run never meets a
broken script: every table row, the bf16 comparison and the accelerate training + evaluation smoke run."""

import json

import pytest
import torch

from benchmarks import gpu, gpu_profile


def test_gpu_benchmark_smoke_runs_every_path(tmp_path):
    results = gpu.main(["--smoke", "--studies", "--no-write", "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text())["smoke"] is True
    measured = {(row["variant"], tuple(row["size"])) for row in results["latency"]}
    # cudnn.benchmark and CUDA graphs: CUDA only
    every_size = gpu.VARIANTS + ["mrovseg_channels_last_stitching", "mrovseg_bf16_map_norms"]
    assert measured == {(variant, tuple(size)) for variant in every_size for size in results["sizes"]} | {
        ("mrovseg_compiled", (64, 64))}
    compiled = next(row for row in results["latency"] if row["variant"] == "mrovseg_compiled")
    assert compiled["labels_agree_with_eager"] > 0.99  # the check that would catch a miscompiled model on a GPU
    assert compiled["first_call_s"] > 0 and "First compiled call (the build): 64 x 64" in gpu.report(results)
    # the candidates: the same values in another layout or rounded in another place, so the same labels up to rounding
    assert all(row["labels_agree_with_eager"] > 0.99 for row in results["latency"]
               if row["variant"] in ("mrovseg_channels_last_stitching", "mrovseg_bf16_map_norms"))
    import modeling_mrovseg.modeling_mrovseg as modeling
    from modeling_mrovseg.slicing import stitch_windows

    assert modeling.stitch_windows is stitch_windows  # the library's own stitching is back
    assert "with channels-last stitching" in gpu.report(results) and "LayerNorms' maps in bf16" in gpu.report(results)
    assert all(row["ms"] > 0 for row in results["latency"])
    extra = results["postprocess_and_batch"]
    assert extra["postprocess_ms"] > 0 and extra["postprocess_full_resampling_ms"] > 0
    # on outputs with segments too, where boundaries are blended (random weights give one class everywhere)
    assert extra["smooth_postprocess_ms"] > 0 and 0 < extra["smooth_boundary_cell_fraction"] < 0.5
    assert extra["batch8_eager_images_per_s"] > 0
    # the score contraction alone, with the smoke run's 5 classes in rows of 6 floats and padded to 8
    assert set(extra["contraction_ms"]) == {"rows_of_6", "padded_to_8"} and min(extra["contraction_ms"].values()) > 0
    assert "the score contraction alone: " in gpu.report(results)
    assert extra["smooth_contiguous_vectors_labels_agree"] == 1.0
    assert extra["smooth_postprocess_contiguous_vectors_ms"] > 0
    for name in ("autocast_bf16", "pure_bf16"):
        agreement = results["bf16_agreement"][name]
        assert agreement["argmax_agreement"] >= 0.99 and agreement["class_rel_err"] < 0.05, agreement
    smoke = results["training_smoke"]
    assert smoke["ok"], smoke.get("stderr")
    assert smoke["steps"] == 4 and 0 <= smoke["mean_iou"] <= 1
    assert "| 96 x 160 |" in gpu.report(results)
    # eager training with the lean and with transformers' QuickGELU in CLIP, side by side; the model gets its own back;
    # the whole forward compiled beside compiled regions, each with its build (traced with aot_eager on the CPU)
    training = results["training"]
    assert [row["variant"] for row in training] == ["eager", "eager_plain_quick_gelu", "compiled", "compiled_regions"]
    assert all(row["images_per_s"] > 0 for row in training) and all(row["first_call_s"] > 0 for row in training[2:])
    assert "transformers' QuickGELU in CLIP" in gpu.report(results)
    assert "compiled (`--compile`)" in gpu.report(results) and "compiled regions" in gpu.report(results)


def test_gpu_benchmark_without_studies_measures_what_the_targets_need(tmp_path):
    """The default run (what fits the issue's five minutes on a GPU): the table's rows, post-processing on the model's
    outputs and on outputs with segments, batch 8, training, agreement and the smoke run; no side-by-side study."""
    results = gpu.main(["--smoke", "--no-write", "--sections", "latency", "postprocess_and_batch", "training"])
    measured = {(row["variant"], tuple(row["size"])) for row in results["latency"]}
    assert measured == {(v, tuple(size)) for v in gpu.VARIANTS for size in results["sizes"]} | {
        ("mrovseg_compiled", (64, 64))}
    extra = results["postprocess_and_batch"]
    assert set(extra) == {"postprocess_size", "postprocess_ms", "smooth_postprocess_ms",
                          "smooth_boundary_cell_fraction", "batch8_size", "batch8_eager_images_per_s"}
    assert [row["variant"] for row in results["training"]] == ["eager", "compiled_regions"]
    assert results["studies"] is False and set(results["section_seconds"]) == {"latency", "postprocess_and_batch",
                                                                                "training"}
    text = gpu.report(results)
    assert "Side by side" not in text and "(default). Batch of 8" in text and "Run time " in text


def test_gpu_benchmark_compiles_once_per_mode_and_begins_a_graph_step_per_call(monkeypatch):
    """The latency table and the batch of 8 share one compiled forward per mode; with CUDA graphs every call begins a
    graph step first (its outputs may overwrite the last call's), as the zero-shot pipeline's calls do."""
    import argparse

    builds, steps = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **options: builds.append(options) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append("step"))
    args = argparse.Namespace(preset="tiny", num_labels=3, compile_backend="inductor", compile_mode="reduce-overhead",
                              fast=None, compiled={})
    device = torch.device("cpu")
    graphs = gpu.compiled_forward(args, device)
    assert gpu.compiled_forward(args, device, "reduce-overhead") is graphs and len(builds) == 1
    assert builds[0]["mode"] == "reduce-overhead" and builds[0]["dynamic"] is False
    processor, inputs = gpu.inputs_for(args.fast, (48, 64), device)
    with torch.inference_mode():
        graphs(**inputs)
        graphs(**inputs)
        assert steps == ["step", "step"]
        gpu.compiled_forward(args, device, "default")(**inputs)
    assert steps == ["step", "step"] and len(builds) == 2 and "mode" not in builds[1]
    gpu.release_inference(args, device)  # before training: its peak memory then counts training only
    assert args.fast is None and args.compiled == {}


def test_gpu_benchmark_runs_a_part_and_reports_only_that(tmp_path):
    results = gpu.main(["--smoke", "--no-write", "--sections", "latency", "--sizes", "48x64", "--compiled-sizes"])
    assert {row["variant"] for row in results["latency"]} == set(gpu.VARIANTS)
    text = gpu.report(results)
    assert "| 48 x 64 |" in text and "training" not in text and "Post-processing" not in text
    with pytest.raises(SystemExit):
        gpu.main(["--smoke", "--sizes", "640"])  # not HxW: a usage error, not a traceback


def test_gpu_profile_times_every_stage_of_the_pipeline():
    from modeling_mrovseg import image_processing_mrovseg

    post_processing = image_processing_mrovseg.semantic_scores, image_processing_mrovseg.label_scores
    result, compiled = gpu_profile.main(["--smoke"])
    # its ranges around post-processing's steps are gone afterwards
    assert (image_processing_mrovseg.semantic_scores, image_processing_mrovseg.label_scores) == post_processing
    post = {f"{run}{step}" for run in ("postprocess", "postprocess_segments") for step in ("", ":scores", ":labels")}
    assert set(result["stages"]) == set(gpu_profile.module_groups(gpu.build("tiny", 2, "cpu"))) | {"forward"} | post
    assert 0 < result["segments_boundary_cell_fraction"] < 0.5
    assert all(stage["cpu_ms"] > 0 for stage in result["stages"].values())
    assert result["stages"]["forward"]["cpu_ms"] >= result["stages"]["clip"]["cpu_ms"]
    # each stage names where its time went (on a CPU: its innermost ops by host time, largest first)
    for stage in result["stages"].values():
        assert stage["top"] and all(top["name"].startswith("cpu:aten::") for top in stage["top"])
        assert [top["ms"] for top in stage["top"]] == sorted((top["ms"] for top in stage["top"]), reverse=True)
    # then the compiled forward (traced by aot_eager on a CPU), whose costliest ops are listed without module ranges
    assert compiled["backend"] == "aot_eager" and len(compiled["top"]) == 10
    assert any("addmm" in top["name"] or "conv" in top["name"] for top in compiled["top"])


def test_aten_op_count_proxy_sees_the_casts_that_bf16_weights_remove():
    from benchmarks.run import count_aten_ops

    default = count_aten_ops((256, 256))
    bf16 = count_aten_ops((256, 256), bf16_weights=True)
    assert 300 < bf16 < default  # autocast's per-op casts of fp32 weights are part of the default's count


def test_aten_op_count_splits_and_keeps_lazy_initialisations_out():
    from benchmarks.run import count_aten_ops
    from modeling_mrovseg.image_processing_mrovseg import _device_taps

    _device_taps.cache_clear()  # the first count in a process pays for the resampling taps unless warmed up
    first = count_aten_ops((256, 256), bf16_weights=True, slice_batch_size=None, detail=True)
    second = count_aten_ops((256, 256), bf16_weights=True, slice_batch_size=None, detail=True)
    assert first == second
    assert 0 < first["after_clip_launching"] < first["after_clip"] < first["ops"]
    assert first["after_clip_launching"] < first["launching"] < first["ops"]


def test_moves_no_data_tells_views_from_kernels():
    from benchmarks.run import DispatchTally

    x = torch.randn(4, 6)
    with torch.inference_mode():
        for fn, free in ((lambda: x.view(6, 4), True), (lambda: x.t().reshape(24), False), (lambda: x + 1, False),
                         (lambda: x.clone().add_(1), False), (lambda: x.to(torch.float32), True),
                         (lambda: x[:, 1:].unsqueeze(0), True), (lambda: torch.zeros(3), False)):
            with DispatchTally() as tally:
                fn()
            assert (tally.data_free == tally.ops) is free and tally.ops > 0


def test_postprocess_benchmark_compares_the_two_labellings_on_the_same_scores():
    from benchmarks.run import postprocess_benchmark, stamp

    (row,) = postprocess_benchmark(sizes=((128, 192),), num_classes=12, queries=8, runs=1)
    assert row["identical_fraction"] == 1.0 and 0 < row["boundary_cell_fraction"] < 0.5
    assert row["corners_seconds"] > 0 and row["full_resampling_seconds"] > 0
    # the scores' traffic: masks read in bf16 (8 x 64 x 96 x 2 B), cast, sigmoid, contraction, at least
    masks = 8 * 64 * 96
    assert row["traffic_gb"]["scores"] * 1e9 >= masks * (2 + 4) + masks * (4 + 4) + masks * 4 + 64 * 96 * 12 * 4
    assert row["traffic_gb"]["labels"] * 1e9 >= 128 * 192 * 8  # the int64 label map written, at least
    # a section measured apart from the saved report names its own machine and date
    report = {"machine": "x, 2026-11-26", "measured": {"postprocess": "x, 2026-11-27", "aten": "x, 2026-11-26"}}
    assert "2026-11-27" in stamp(report, "postprocess") and stamp(report, "aten") == stamp(report, "metric") == ""


def test_training_memory_trace_sees_what_the_lean_quick_gelu_saves():
    """The fake-tensor trace of a training step: the lean QuickGELU keeps one MLP-wide tensor per CLIP layer and token
    less than transformers' (the sigmoid), and nothing else changes."""
    import numpy as np

    from benchmarks.memory import training_memory
    from modeling_mrovseg import MROVSegConfig, MROVSegImageProcessor

    plain, lean = (training_memory("tiny", batch=2, crop=96, num_labels=5, plain_activation=p) for p in (True, False))
    assert 0 < lean["model_and_optimizer_gb"] == plain["model_and_optimizer_gb"]
    assert 0 < lean["kept_for_backward_gb"] < lean["peak_gb"]
    config = MROVSegConfig.from_preset("tiny")
    vision = config.vision_config
    slices = MROVSegImageProcessor.from_model_config(config)(
        list(np.zeros((2, 96, 96, 3), np.uint8)), do_resize=False, return_tensors="pt")["pixel_values_slices"]
    windows = slices.shape[0] * (1 + slices.shape[1])  # global views and slices, through the backbone's layers
    backbone_layers = max(set(config.feature_layers) | set(range(config.query_layer, vision.num_hidden_layers)))
    tokens = backbone_layers * windows * (1 + (vision.image_size // vision.patch_size) ** 2)
    tokens += (vision.num_hidden_layers - config.query_layer) * 2 * config.num_queries  # the masked attention's
    sigmoid_bytes = tokens * vision.intermediate_size * 2  # bf16
    saved = (plain["kept_for_backward_gb"] - lean["kept_for_backward_gb"]) * 1024**3
    assert saved == pytest.approx(sigmoid_bytes, rel=0.01)
    # the side-by-side swap (benchmarks.gpu times eager training both ways) gives the model its own activations back
    from transformers.activations import QuickGELUActivation

    from benchmarks.memory import plain_quick_gelu
    from modeling_mrovseg import MROVSegForOpenVocabSegmentation
    from modeling_mrovseg.layers import MROVSegQuickGELU

    model = MROVSegForOpenVocabSegmentation(config)
    layers = model.mrovseg.vision_model.encoder.layers
    with plain_quick_gelu(model):
        assert all(type(layer.mlp.activation_fn) is QuickGELUActivation for layer in layers)
    assert all(isinstance(layer.mlp.activation_fn, MROVSegQuickGELU) for layer in layers)


def test_gpu_report_sets_the_cuda_only_variants_beside_their_baselines():
    rows = [{"variant": v, "size": [640, 640], "ms": ms, "peak_gb": 1.0} for v, ms in
            (("mrovseg", 15.0), ("mrovseg_bf16", 14.0), ("clip_floor", 5.0), ("mrovseg_compiled", 9.0),
             ("mrovseg_cudnn_benchmark", 12.5), ("mrovseg_cuda_graphs", 6.5))]
    rows[-1]["labels_agree_with_eager"] = 1.0
    text = "\n".join(gpu.latency_lines(rows, [(640, 640)]))
    # the table's best is a supported path's: CUDA graphs (the pipeline's compile="reduce-overhead"), not cuDNN's search
    assert "| 640 x 640 | 15.0 | 14.0 | 6.5 (graphs) | 5.0 | +30% |" in text
    assert "`cudnn.benchmark` 12.5 ms against 14.0" in text and 'reduce-overhead"`) 6.5 ms against 9.0' in text
    assert "640 x 640 100.000% (CUDA graphs)" in text


def test_gpu_profile_counts_kernels_not_the_ranges_around_them():
    """On a GPU a `record_function` range shows among the device events too, spanning its kernels and the gaps
    between them: the kernel count and time per run leave it out (H200, 640^2: 45.8 ms "of kernels" with the ranges,
    where the stages' kernels add up to 4.4)."""
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name="stage:forward", device_type=cuda, is_user_annotation=True, device_time=900.0),
              SimpleNamespace(name="stage:clip", device_type=cuda, is_user_annotation=False, device_time=500.0),
              SimpleNamespace(name="ampere_gemm", device_type=cuda, is_user_annotation=False, device_time=30.0),
              SimpleNamespace(name="aten::mm", device_type=cpu, is_user_annotation=False, device_time=0.0)]
    assert [e.name for e in gpu_profile.device_kernels(events)] == ["ampere_gemm"]


def test_gpu_candidates_patch_in_and_out():
    """The candidates benchmarks.gpu times beside the library: inside, the 2-D LayerNorms give bf16 maps of bf16 maps
    under bf16 autocast (float32 maps unchanged) close to autocast's own, and boundary blending gets contiguous
    class vectors of the same values; afterwards the library's own code is back."""
    import modeling_mrovseg.image_processing_mrovseg as processing
    from modeling_mrovseg.layers import MROVSegLayerNorm2d

    norm = MROVSegLayerNorm2d(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    maps = torch.randn(2, 8, 5, 7).to(torch.bfloat16)
    forward, vectors = MROVSegLayerNorm2d.forward, processing.class_vectors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = norm(maps)
        with gpu.map_norms_in_bf16():
            candidate = norm(maps)
            assert norm(maps.float()).dtype == torch.float32  # float32 maps are left to the library
    # (CPU autocast leaves layer_norm in bf16 already; CUDA's gives float32 maps, which the candidate avoids)
    assert candidate.dtype == torch.bfloat16
    torch.testing.assert_close(candidate.float(), reference.float(), rtol=0.02, atol=0.02)
    flat, index = torch.randn(6, 40), torch.randint(0, 40, (9, 4))
    with gpu.contiguous_class_vectors():
        gathered = processing.class_vectors(flat, index)
    assert gathered.is_contiguous() and torch.equal(gathered, vectors(flat, index))
    assert not vectors(flat, index).is_contiguous()  # the library hands the product a strided view
    assert MROVSegLayerNorm2d.forward is forward and processing.class_vectors is vectors


def test_photo_benchmark_runs_the_cli_on_one_photo():
    """`benchmarks.memory --photo`: the CLI end to end in a child process, and the overlay's two PNG levels side by
    side (the fastest is never the smallest)."""
    from PIL import Image

    from benchmarks.memory import photo_run

    limit = Image.MAX_IMAGE_PIXELS
    row = photo_run(300, 200)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's bomb limit is left as it was for the tests after this one
    assert "error" not in row, row
    assert row["photo"] == "300x200" and row["cli_seconds"] > 0 and row["cli_peak_rss_gb"] > 0.1
    assert row["overlay_png_mb_level6_vs_1"][0] <= row["overlay_png_mb_level6_vs_1"][1]
