"""onnxruntime (CPU) against PyTorch eager on this CPU, same ViT-B/16-shaped model and input.

    python -m benchmarks.export [--size 640]     # writes the "export" section of RESULTS.md

Exports the image path (random weights, 150 classes) to ONNX, checks parity on a fresh image (max |logit diff|,
label agreement) and times both runtimes side by side in this process (median of 3 after a warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_seconds(fn, runs: int = 3) -> float:
    """Median seconds of `fn()` over `runs` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    from benchmarks.results_file import machine, write_section
    from benchmarks.run import vit_b16_model
    from modeling_mrovseg.export import ExportedSegmenter, example_inputs, export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    model = vit_b16_model(num_labels=150)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = export(model, args.size, args.size, Path(tmp) / "mrovseg.onnx")
        export_s = time.perf_counter() - started
        segmenter = ExportedSegmenter(path)
        inputs = example_inputs(segmenter.processor, args.size, args.size, seed=1)
        with torch.inference_mode():
            reference = model(**inputs)
            torch_s = median_seconds(lambda: model(**inputs))
        class_logits, mask_logits = segmenter.logits(inputs)
        onnx_s = median_seconds(lambda: segmenter.logits(inputs))
        diff = max(float((class_logits - reference.class_queries_logits).abs().max()),
                   float((mask_logits - reference.masks_queries_logits).abs().max()))
        post = segmenter.processor.post_process_semantic_segmentation
        from modeling_mrovseg.modeling_mrovseg import MROVSegOutput

        ours = post(MROVSegOutput(class_queries_logits=class_logits, masks_queries_logits=mask_logits,
                                  image_sizes=reference.image_sizes))[0]
        agreement = float((ours == post(reference)[0]).float().mean())
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
    result = {"size": args.size, "export_s": export_s, "torch_s": torch_s, "onnxruntime_s": onnx_s,
              "max_abs_diff": diff, "label_agreement": agreement, "file_mb": size_mb}
    print(result)
    text = (f"## Export (CPU)\n\n`python -m benchmarks.export --size {args.size}` on {machine()}: ViT-B/16 shapes, random "
            f"weights, 150 classes, fp32, one {args.size} x {args.size} image (forward only, same input, median of 3). "
            f"Export took {export_s:.0f} s ({size_mb:.0f} MB). PyTorch eager {1000 * torch_s:.0f} ms, onnxruntime "
            f"{1000 * onnx_s:.0f} ms: onnxruntime / PyTorch time ratio **{onnx_s / torch_s:.2f}**. Parity: max |logit "
            f"difference| {diff:.1e}, post-processed labels identical on {100 * agreement:.3f}% of pixels.")
    if not args.no_write:
        write_section("export", text)
    return result


if __name__ == "__main__":
    main()
