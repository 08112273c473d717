"""Dataset-level evaluation: sliding-window inference on every image, one streaming mean-IoU at the end."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_mrovseg.cli import one_line

from .data import as_arrays, stray_label_values


@torch.inference_mode()
def evaluate_segmentation(model, image_processor, dataset, class_names: Sequence[str], metric,
                          indices: Sequence[int] | None = None, text_embeds: torch.Tensor | None = None,
                          show_progress: bool = True) -> dict:
    """
    Segment `dataset[indices]` at the processor's resolution, compare with the labels at their own size and
    return mean IoU, accuracies and per-class IoU by name. `metric` is an evaluate module with the `mean_iou`
    interface (ours merges processes; each process passes its own `indices`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    indices = range(len(dataset)) if indices is None else indices
    # unlabelled pixels (255, or 65535 past 255 classes) count as the class after the last: the metric's histogram
    # then spans the class ids, not every value up to 65535
    num_classes = len(class_names)
    ignore = model.config.ignore_index
    failure = None
    for index in tqdm(indices, desc="evaluating", disable=not show_progress, unit="image"):
        try:
            image, label = as_arrays(dataset[int(index)])
            stray = stray_label_values(label, num_classes, ignore)
            if stray:  # the metric counts no class there: a mismatched vocabulary would score silently high
                raise ValueError(f"its label holds values {stray[:5]}, neither class ids "
                                 f"0..{num_classes - 1} of the {num_classes} class names nor unlabelled ({ignore}): "
                                 "the labels and the class names do not match")
        except (OSError, ValueError) as error:
            failure = f"evaluation image {int(index)}: {one_line(error)}"
            break
        inputs = image_processor(image, return_pixel_mask=True, return_tensors="pt").to(device)
        outputs = model(**inputs, text_embeds=text_embeds)
        prediction = image_processor.post_process_semantic_segmentation(outputs, target_sizes=[label.shape])[0]
        reference = np.where(label == ignore, num_classes, label)
        metric.add(prediction=prediction.cpu().numpy(), reference=reference)
    failure = first_failure(failure)
    try:  # every process computes (the metric gathers across them) and the metric starts empty next time
        results = metric.compute(num_labels=num_classes, ignore_index=num_classes)
    except ValueError:
        if failure is None:
            raise
    model.train(was_training)
    if failure is not None:
        raise ValueError(failure)
    per_class = np.asarray(results["per_category_iou"], dtype=np.float64)
    return {  # None (JSON null, not the invalid NaN) where nothing was scored: images without a labelled pixel
        "mean_iou": finite_or_none(results["mean_iou"]),
        "mean_accuracy": finite_or_none(results["mean_accuracy"]),
        "overall_accuracy": finite_or_none(results["overall_accuracy"]),
        "per_class_iou": {name: finite_or_none(v) for name, v in zip(class_names, per_class)},
        "num_images": len(indices),
    }


def first_failure(failure: str | None) -> str | None:
    """The first process's failure, on every process: one that went on alone to the metric's gather, or to the next
    training step, would wait for the failed one forever."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return failure
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, failure)
    return next((item for item in gathered if item is not None), None)


def finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def format_miou(value: float | None) -> str:
    """mIoU for people: a percentage, or why there is none."""
    return "n/a (no labelled pixel in the images)" if value is None else f"{100 * value:.2f}%"


__all__ = ["evaluate_segmentation", "format_miou"]
