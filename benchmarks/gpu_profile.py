"""Where the time goes: kernel time per module of one eager forward plus post-processing, and kernels per run.

    python -m benchmarks.gpu_profile                 # on a CUDA device: ViT-B/16, bf16 weights, 640^2 and 2048^2,
                                                     # then the compiled forward's costliest kernels at 2048^2
    python -m benchmarks.gpu_profile --smoke         # the same code on the CPU with the tiny config (CPU times only)

Each module of the pipeline runs inside a `record_function` range (forward hooks), so the profiler's per-range
device time is the sum of the kernels that module launched; post-processing is split into its two steps (class
scores, labels) and also profiled on outputs with segments (`benchmarks.run.smooth_outputs`), since a random-weight
model's maps are one class everywhere. Each stage also lists its five costliest kernels (by name, summed per run), so a
stage's time says which kernels to look at. Complements `benchmarks.gpu`'s end-to-end timings.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import modeling_mrovseg.image_processing_mrovseg as image_processing
from benchmarks.gpu import build, image_size, inputs_for
from benchmarks.run import boundary_cell_fraction, smooth_outputs


def module_groups(model) -> dict[str, list[torch.nn.Module]]:
    """The pipeline's stages, in order. CLIP is hooked layer by layer: `_run_clip` calls its parts directly."""
    core, vision = model.mrovseg, model.mrovseg.vision_model
    return {"clip": [vision.embeddings, vision.pre_layrnorm, *vision.encoder.layers], "adapters": list(core.adapters),
            "pixel_decoder": [core.pixel_decoder], "query_decoder": [core.query_decoder],
            "masked_attention": [model.masked_attention], "mask_head": [model.mask_head],
            "classifier": [model.classifier]}


def annotate(model) -> list:
    """Wrap every group's modules in `record_function("stage:<group>")`; returns the hook handles."""
    open_ranges, handles = [], []
    for name, modules in module_groups(model).items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, name=name: open_ranges.append(record_function(f"stage:{name}").__enter__())))
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o: open_ranges.pop().__exit__(None, None, None)))
    return handles


@contextlib.contextmanager
def ranged_postprocessing(run: str):
    """Within it, post-processing's two steps (module functions it looks up at each call) run inside ranges named
    `stage:<run>:scores` and `stage:<run>:labels`; the functions are restored on leaving."""
    originals = {name: getattr(image_processing, name) for name in ("semantic_scores", "label_scores")}

    def ranged(function, step):
        def call(*args, **kwargs):
            with record_function(f"stage:{run}:{step}"):
                return function(*args, **kwargs)
        return call

    try:
        for (name, function), step in zip(originals.items(), ("scores", "labels")):
            setattr(image_processing, name, ranged(function, step))
        yield
    finally:
        for name, function in originals.items():
            setattr(image_processing, name, function)


def top_work(prof, runs: int, count: int = 5) -> dict[str, list[dict]]:
    """Per stage, the kernels that took the most device time (by kernel name, per run), so a stage's time says which
    kernels to look at; on a CPU, where nothing launches kernels, the innermost ops by host time instead."""
    from collections import defaultdict

    tallies: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for event in prof.events():
        if not event.name.startswith("stage:") or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        tally, pending = tallies[event.name[6:]], list(event.cpu_children)
        while pending:
            child = pending.pop()
            pending.extend(child.cpu_children)
            for kernel in child.kernels:
                tally[kernel.name][0] += kernel.duration
                tally[kernel.name][1] += 1
            if not child.cpu_children and not child.kernels:
                tally["cpu:" + child.name][0] += child.cpu_time_total
                tally["cpu:" + child.name][1] += 1
    tops = {}
    for stage, tally in tallies.items():
        kernels = {name: value for name, value in tally.items() if not name.startswith("cpu:")}
        tops[stage] = costliest(kernels or tally, runs, count)
    return tops


def device_kernels(events) -> list:
    """The kernels among a profile's device events: a `record_function` range also appears there, as an annotation
    spanning its first to last kernel, idle gaps included (counted in, they tripled the kernel time per run)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False) and not e.name.startswith("stage:")]


def costliest(totals: dict[str, list[float]], runs: int, count: int) -> list[dict]:
    """The `count` largest of {name: [microseconds, calls]} over `runs` runs, as per-run milliseconds and calls."""
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [{"name": name[:120], "ms": total / 1000 / runs, "per_run": calls / runs} for name, (total, calls) in ranked]


def profiled(run, device, runs: int):
    """The profiler's record of `runs` calls of `run()`, after three untimed ones (lazy initialisations, compiles)."""
    for _ in range(3):
        run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof


def profile_size(model, size, device, runs: int = 3) -> dict:
    processor, inputs = inputs_for(model, size, device)
    segments = smooth_outputs(size, model.config.num_labels, model.config.num_queries, device, torch.bfloat16)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            with record_function("stage:forward"):
                outputs = model(**inputs)
            for name, source in (("postprocess", outputs), ("postprocess_segments", segments)):
                with record_function(f"stage:{name}"), ranged_postprocessing(name):
                    processor.post_process_semantic_segmentation(source, target_sizes=[size])

    prof = profiled(run, device, runs)
    stages = {}
    tops = top_work(prof, runs)
    for event in prof.key_averages():
        # host-side ranges only: their device time is the sum of the kernels launched inside them (the device-side
        # copies of a range span first to last kernel, idle gaps included)
        if event.key.startswith("stage:") and event.cpu_time_total > 0:
            stages[event.key[6:]] = {"device_ms": event.device_time_total / 1000 / runs,
                                     "cpu_ms": event.cpu_time_total / 1000 / runs, "top": tops.get(event.key[6:], [])}
    kernels = device_kernels(prof.events())
    boundary = boundary_cell_fraction(image_processing.semantic_scores(segments)[0])
    return {"size": list(size), "stages": stages, "kernels_per_run": len(kernels) / runs,
            "segments_boundary_cell_fraction": boundary,
            "kernel_ms_per_run": sum(k.device_time for k in kernels) / 1000 / runs}


def profile_compiled(model, size, device, backend: str, runs: int = 3, count: int = 10) -> dict:
    """Kernels of the compiled forward (`torch.compile(dynamic=False)`, no post-processing), the costliest first:
    inside one graph there are no modules to range over, but inductor's fused kernels name the ops they fuse. On a
    CPU, the ops by host time instead."""
    _, inputs = inputs_for(model, size, device)
    compiled = torch.compile(model, dynamic=False, backend=backend)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            compiled(**inputs)

    prof = profiled(run, device, runs)
    kernels = device_kernels(prof.events())
    totals: dict[str, list[float]] = {}
    for kernel in kernels:
        total = totals.setdefault(kernel.name, [0.0, 0])
        total[0] += kernel.device_time
        total[1] += 1
    if not kernels:
        totals = {e.key: [e.self_cpu_time_total, e.count] for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return {"size": list(size), "backend": backend, "kernels_per_run": len(kernels) / runs,
            "kernel_ms_per_run": sum(k.device_time for k in kernels) / 1000 / runs,
            "top": costliest(totals, runs, count)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    parser.add_argument("--sizes", nargs="+", type=image_size, default=None)
    parser.add_argument("--compiled-sizes", nargs="*", type=image_size, default=None,
                        help="also profile the compiled forward at these sizes (default: 2048x2048; none: no compile)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check of the same code paths")
    preset, sizes = ("tiny", [(64, 64)]) if args.smoke else ("vit-b-16", [(640, 640), (2048, 2048)])
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build(preset, 150, device, dtype=torch.bfloat16, slice_batch_size=None)
    annotate(model)
    results = []
    for size in args.sizes or sizes:
        result = profile_size(model, size, device)
        results.append(result)
        print(f"{size[0]} x {size[1]}: {result['kernels_per_run']:.0f} kernels, {result['kernel_ms_per_run']:.2f} ms "
              "of kernels per forward + post-processing (of the model's outputs and of outputs with segments, "
              f"{100 * result['segments_boundary_cell_fraction']:.0f}% boundary cells)")
        for name, stage in sorted(result["stages"].items(), key=lambda item: -item[1]["device_ms"]):
            print(f"  {name:28s} {stage['device_ms']:8.2f} ms kernels {stage['cpu_ms']:8.2f} ms host")
            for top in stage["top"][:3 if name in ("forward", "postprocess", "postprocess_segments") else 5]:
                print(f"      {top['ms']:8.3f} ms {top['per_run']:5.0f}x {top['name'][:90]}")
    # the smoke run traces (aot_eager) without code generation: inductor's C++ builds take minutes on a CPU
    backend = "aot_eager" if args.smoke else "inductor"
    compiled_sizes = args.compiled_sizes if args.compiled_sizes is not None else [sizes[-1]]
    if compiled_sizes:
        plain = build(preset, 150, device, dtype=torch.bfloat16, slice_batch_size=None)  # no ranges: one graph
        for size in compiled_sizes:
            result = profile_compiled(plain, size, device, backend)
            results.append(result)
            print(f"{size[0]} x {size[1]} compiled forward ({backend}): {result['kernels_per_run']:.0f} kernels, "
                  f"{result['kernel_ms_per_run']:.2f} ms of kernels; the costliest:")
            for top in result["top"]:
                print(f"      {top['ms']:8.3f} ms {top['per_run']:5.0f}x {top['name'][:90]}")
    return results


if __name__ == "__main__":
    main()
