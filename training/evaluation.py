"""Dataset-level evaluation: sliding-window inference on every image, one streaming mean-IoU at the end."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import as_arrays


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
    for index in tqdm(indices, desc="evaluating", disable=not show_progress, unit="image"):
        image, label = as_arrays(dataset[int(index)])
        inputs = image_processor(image, return_pixel_mask=True, return_tensors="pt").to(device)
        outputs = model(**inputs, text_embeds=text_embeds)
        prediction = image_processor.post_process_semantic_segmentation(outputs, target_sizes=[label.shape])[0]
        reference = np.where(label == model.config.ignore_index, num_classes, label)
        metric.add(prediction=prediction.cpu().numpy(), reference=reference)
    results = metric.compute(num_labels=num_classes, ignore_index=num_classes)
    model.train(was_training)
    per_class = np.asarray(results["per_category_iou"], dtype=np.float64)
    return {  # None (JSON null, not the invalid NaN) where nothing was scored: images without a labelled pixel
        "mean_iou": finite_or_none(results["mean_iou"]),
        "mean_accuracy": finite_or_none(results["mean_accuracy"]),
        "overall_accuracy": finite_or_none(results["overall_accuracy"]),
        "per_class_iou": {name: finite_or_none(v) for name, v in zip(class_names, per_class)},
        "num_images": len(indices),
    }


def finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def format_miou(value: float | None) -> str:
    """mIoU for people: a percentage, or why there is none."""
    return "n/a (no labelled pixel in the images)" if value is None else f"{100 * value:.2f}%"


__all__ = ["evaluate_segmentation", "format_miou"]
