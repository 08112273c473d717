"""Peak memory and latency of full-resolution inference with a ViT-B/16-shaped MROVSeg (random weights).

Each size runs in its own process so peak RSS is that run's alone:
    python -m benchmarks.memory --sizes 1024 2048 4096 --slice-batch-size 16
Images are segmented at their own resolution (no downscaling: `shortest_edge` = the image side).
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--slice-batch-size", type=int, default=16)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
