"""Evaluate an MROVSeg checkpoint on a segmentation dataset (multi-resolution sliding-window inference).

    accelerate launch -m training.evaluate --model runs/coco-stuff/model --dataset DIR_OR_HUB_ID \
        --split validation --output results/ade150.json

The dataset's class names become the model's vocabulary for the run (zero-shot transfer when they differ from
the training vocabulary). Prints and writes mIoU, accuracies and per-class IoU; several processes split the images
and merge their confusion histograms.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from modeling_mrovseg import MEAN_IOU
from modeling_mrovseg.cli import check_source, one_line, write_atomically


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=os.path.expanduser, required=True, help="MROVSeg checkpoint folder or Hub id")
    parser.add_argument("--dataset", type=os.path.expanduser, required=True,
                        help="folder of parquet files, a DatasetDict.save_to_disk folder or a Hub dataset id")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--class_names", default=None,
                        help="class names: a JSON list, a file (JSON list, id2label.json, class table .csv, one "
                             "per line) or comma-separated (default: from the dataset)")
    parser.add_argument("--benchmark_name", default=None, help="name for the results (default: the dataset)")
    parser.add_argument("--output", default=None, type=os.path.expanduser, help="results JSON (default: printed only)")
    parser.add_argument("--eval_size", type=int, default=640, help="shortest edge the images are resized to")
    parser.add_argument("--slice_batch_size", type=int, default=None)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--metric", default=MEAN_IOU)
    # default None: an explicit "no" here overrode `accelerate launch --mixed_precision bf16` (fp32, silently)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                        help="default: accelerate's (accelerate launch --mixed_precision, or `accelerate "
                             "config`; no without them)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (inductor); pays off for many images of one size")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("eval_size", "max_samples", "slice_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_source(parser, "--model", args.model, "an MROVSeg checkpoint folder")
    check_source(parser, "--dataset", args.dataset, "a folder of parquet files or a save_to_disk folder")
    if args.output:
        try:
            check_writable_file(Path(args.output))
        except ValueError as error:
            parser.error(str(error))
    return args


def check_writable_file(path: Path) -> None:
    """Before hours of evaluation: `--output` can be written (not a folder, its folder creatable and writable)."""
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name such as {path / 'results.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}."):  # one per process
            pass
    except OSError as error:
        raise ValueError(f"--output {path} cannot be written: {error.strerror or error}") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    import evaluate
    from accelerate import Accelerator

    from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegImageProcessor
    from training.data import load_segmentation_dataset, loading, shard_indices
    from training.evaluation import evaluate_segmentation, format_miou

    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              dynamo_backend="inductor" if args.compile else None)
    with loading("--dataset", args.dataset):
        dataset, class_names = load_segmentation_dataset(args.dataset, args.split, args.class_names)
    with loading("--metric", args.metric):
        metric = evaluate.load(args.metric)
    with loading("--model", args.model):
        model = MROVSegForOpenVocabSegmentation.from_pretrained(args.model)
        model.check_complete()
    if args.slice_batch_size:
        model.config.slice_batch_size = args.slice_batch_size
    if model.vocabulary != list(class_names):  # the benchmark's classes, embedded with the checkpoint's tokenizer
        if model.clip_tokenizer is None:
            raise SystemExit(f"error: {args.model} has no CLIP tokenizer ({model.missing_tokenizer()}) to embed the "
                             f"dataset's class names with (its vocabulary is {model.vocabulary[:5]}...); save the "
                             "checkpoint with its tokenizer")
        model.set_vocabulary(class_names)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    config = accelerator.unwrap_model(model).config
    processor = MROVSegImageProcessor.from_model_config(
        config, size=MROVSegImageProcessor.size_for_resolution(args.eval_size))
    count = len(dataset) if args.max_samples is None else min(len(dataset), args.max_samples)
    try:
        with accelerator.autocast():
            results = evaluate_segmentation(accelerator.unwrap_model(model), processor, dataset, class_names,
                                            metric,
                                            shard_indices(count, accelerator.process_index, accelerator.num_processes),
                                            show_progress=accelerator.is_main_process and not args.no_progress)
    except (OSError, ValueError) as error:  # a bad image or label: one line (on every process), no results file
        raise SystemExit(f"error: evaluating on --dataset {args.dataset} failed at {one_line(error)}") from None
    results.update(num_images=count, benchmark=args.benchmark_name or Path(args.dataset).name, split=args.split,
                   model=args.model, eval_size=args.eval_size)
    if accelerator.is_main_process:
        width = max(len(name) for name in class_names)
        for name, iou in results["per_class_iou"].items():
            print(f"{name:<{width}}  {'  n/a' if iou is None else f'{100 * iou:5.1f}'}")
        # the resolution too: the protocol's fixed 640 px, not the checkpoint's own processor (the main job's 512)
        print(f"mIoU {format_miou(results['mean_iou'])} over {count} images of {results['benchmark']} ({args.split}) "
              f"at shortest edge {args.eval_size}")
        if args.output:
            try:
                write_atomically(Path(args.output), json.dumps(results, indent=2))
            except OSError as error:  # a full disk after hours of evaluation: the scores are above, not lost
                accelerator.end_training()
                raise SystemExit(f"error: cannot write --output {args.output} ({error.strerror or error}); the scores "
                                 "are printed above") from None
    # the process group goes while the interpreter is whole: left to its finalisation, gloo's workers may still hold
    # tensors of the last gather, whose release then needs a GIL that is going away
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
