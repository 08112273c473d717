"""Dataset-level evaluation: sliding-window inference on every image, one streaming mean-IoU at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_mrovseg.cli import one_line

from .data import row_arrays, stray_label_values


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
            image, label = row_arrays(dataset, int(index))
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


def trainer_mean_iou(config) -> dict:
    """
    `preprocess_logits_for_metrics` and `compute_metrics` for transformers' `Trainer`: the mean IoU of the
    evaluation set on the collator's labels (the processor's canvas; unlabelled and padding pixels not counted),
    labelled as `post_process_semantic_segmentation` labels. `config` is the model's (its vocabulary and unlabelled
    value `ignore_index`):

        Trainer(model, args, data_collator=collate, eval_dataset=..., **trainer_mean_iou(model.config))

    Each batch's logits become class-id maps on the device, so Trainer keeps (N, H, W) ids rather than every
    query's mask logits; with `TrainingArguments(batch_eval_metrics=True)` not even those: the histogram streams.
    `trainer.predict` on images without labels returns those maps (the canvas's class ids).
    Label values that are neither a class id nor unlabelled (another vocabulary's) are a `ValueError`, as in
    `training.evaluate`.
    """
    import evaluate

    from modeling_mrovseg import MEAN_IOU
    from modeling_mrovseg.image_processing_mrovseg import image_scores, label_scores

    num_classes, ignore = len(config.id2label), config.ignore_index
    state = {"metric": evaluate.load(MEAN_IOU)}
    # signed, for Trainer's -100 padding, and one that processes can gather: gloo and NCCL have no int16
    id_type = torch.int32

    def preprocess_logits_for_metrics(logits, labels):
        class_logits, mask_logits, *rest = logits  # MROVSegOutput's fields after the loss, in order
        canvas = next((t for t in rest if torch.is_tensor(t) and t.dim() == 2 and t.shape[-1] == 4), None)
        if canvas is not None:  # image_sizes: one canvas per collated batch, in pixels
            size = [int(v) for v in canvas[0, 2:]]
        else:  # the labels cover the canvas; without them, mask resolution
            size = list((labels if labels is not None else mask_logits).shape[-2:])
        outputs = MROVSegScores(class_logits, mask_logits)
        maps = torch.stack([label_scores(scores, None, size).segmentation for scores in image_scores(outputs)])
        if labels is None:  # trainer.predict on images alone: the canvas's class ids
            return maps.to(id_type)
        height, width = labels.shape[-2:]  # Trainer's padding across processes (-100) beyond the canvas
        return torch.nn.functional.pad(maps, (0, width - size[1], 0, height - size[0]), value=-100).to(id_type)

    def compute_metrics(prediction, compute_result: bool = True) -> dict:
        pairs = []
        for predicted, label in zip(prediction.predictions, prediction.label_ids):
            predicted, label = np.asarray(torch.as_tensor(predicted).cpu()), np.asarray(torch.as_tensor(label).cpu())
            label = np.where(label == -100, ignore, label)
            stray = stray_label_values(label, num_classes, ignore)
            if stray:  # the metric counts no class there: a mismatched vocabulary would score silently high
                state["metric"] = evaluate.load(MEAN_IOU)  # the next evaluation starts from nothing
                raise ValueError(f"evaluation labels hold values {stray[:5]}, neither class ids 0..{num_classes - 1} "
                                 f"of the model's {num_classes} classes nor unlabelled ({ignore})")
            pairs.append((np.where(predicted < 0, num_classes, predicted),
                          np.where(label == ignore, num_classes, label)))
        for predicted, reference in pairs:
            state["metric"].add(prediction=predicted, reference=reference)
        if not compute_result:  # batch_eval_metrics: more batches to come
            return {}
        results = state["metric"].compute(num_labels=num_classes, ignore_index=num_classes)  # and starts afresh
        return {name: float(results[name]) for name in ("mean_iou", "mean_accuracy", "overall_accuracy")}

    return {"preprocess_logits_for_metrics": preprocess_logits_for_metrics, "compute_metrics": compute_metrics}


class MROVSegScores(NamedTuple):
    """The two logits that labelling reads, as the model's output names them."""

    class_queries_logits: torch.Tensor
    masks_queries_logits: torch.Tensor


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


__all__ = ["evaluate_segmentation", "format_miou", "trainer_mean_iou"]
