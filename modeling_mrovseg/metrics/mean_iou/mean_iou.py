"""Streaming mean IoU: the same arguments and values as the Hub's `mean_iou`, in bounded memory.

The Hub module keeps every map in an Arrow cache and histograms them at the end. This one keeps a joint
histogram of (reference value, prediction value) pairs, updated with `torch.bincount` as batches arrive; the
label remapping (`label_map`, `reduce_labels`), `ignore_index` and `num_labels` given to `compute` are applied
to the histogram's *values*, which is exact because they act on each pixel's value alone. Processes merge their
histograms (torch.distributed when initialised) before computing, so several evaluation processes give the
numbers of one.

    from modeling_mrovseg import MEAN_IOU
    metric = evaluate.load(MEAN_IOU)       # the installed module's path: works offline, from any folder
    metric.add_batch(predictions=[pred_map, ...], references=[label_map, ...])
    metric.compute(num_labels=150, ignore_index=255, reduce_labels=False)
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch

_DESCRIPTION = "Mean Intersection-over-Union of semantic segmentation maps, from a streaming histogram."
_KWARGS_DESCRIPTION = """
Args:
    predictions / references: lists of integer maps (numpy arrays, tensors or nested lists) of equal sizes.
    num_labels (int): number of classes; values outside [0, num_labels - 1] are not counted as a class.
    ignore_index (int): reference value excluded from the evaluation.
    nan_to_num (float, optional): replaces NaN (classes absent from both prediction and reference).
    label_map (dict, optional): old id -> new id applied to the references, in order.
    reduce_labels (bool): references 0 -> 255, then every id - 1 (255 stays 255).
Returns: mean_iou, mean_accuracy, overall_accuracy, per_category_iou, per_category_accuracy.
"""

_MAX_DENSE = 1 << 26


def _value_range(values: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor; small unsigned types need no pass over the data."""
    if values.dtype in (torch.uint8, torch.bool):
        return 0, 255 if values.dtype == torch.uint8 else 1
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise ValueError("maps must hold integer class ids")
    low, high = torch.aminmax(values)
    return int(low), int(high)


class JointHistogram:
    """Counts of (reference value, prediction value) pairs over everything added so far."""

    def __init__(self):
        self.counts: torch.Tensor | None = None  # (rows, cols) int64
        self.row_offset = 0
        self.col_offset = 0

    def update(self, prediction, reference) -> None:
        """Add one prediction / reference pair of the same shape (a transposed map is an error, not a score)."""
        pred, ref = np.asarray(prediction), np.asarray(reference)
        if pred.shape != ref.shape:
            raise ValueError(f"prediction has shape {pred.shape} but reference has shape {ref.shape}; resize the "
                             "prediction to the reference's size (post_process_semantic_segmentation's target_sizes).")
        pred, ref = torch.as_tensor(pred).flatten(), torch.as_tensor(ref).flatten()
        if ref.numel() == 0:
            return
        rmin, rmax = _value_range(ref)
        pmin, pmax = _value_range(pred)
        rows, cols = rmax - rmin + 1, pmax - pmin + 1
        if rows * cols > _MAX_DENSE:
            raise ValueError(f"value ranges too wide for a histogram ({rows} x {cols}); are these class-id maps?")
        # int32 keys halve the memory traffic of this memory-bound loop; they fit because rows * cols <= 2^26
        keys = (ref.to(torch.int32) - rmin) * cols + (pred.to(torch.int32) - pmin)
        batch = torch.bincount(keys, minlength=rows * cols).view(rows, cols)
        self._add(batch, rmin, pmin)

    def _add(self, batch: torch.Tensor, row_offset: int, col_offset: int) -> None:
        if self.counts is None:
            self.counts, self.row_offset, self.col_offset = batch.clone(), row_offset, col_offset
            return
        r0, c0 = min(self.row_offset, row_offset), min(self.col_offset, col_offset)
        r1 = max(self.row_offset + self.counts.shape[0], row_offset + batch.shape[0])
        c1 = max(self.col_offset + self.counts.shape[1], col_offset + batch.shape[1])
        if (r0, c0, r1 - r0, c1 - c0) != (self.row_offset, self.col_offset, *self.counts.shape):
            grown = torch.zeros(r1 - r0, c1 - c0, dtype=torch.long)
            grown[self.row_offset - r0 :][: self.counts.shape[0], self.col_offset - c0 :][:, : self.counts.shape[1]] = self.counts
            self.counts, self.row_offset, self.col_offset = grown, r0, c0
        ro, co = row_offset - self.row_offset, col_offset - self.col_offset
        self.counts[ro : ro + batch.shape[0], co : co + batch.shape[1]] += batch

    def merge_processes(self) -> None:
        """Sum the histograms of all torch.distributed processes (no-op when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        gathered = [None] * torch.distributed.get_world_size()
        state = None if self.counts is None else (self.counts.cpu(), self.row_offset, self.col_offset)
        torch.distributed.all_gather_object(gathered, state)
        self.counts = None
        for item in gathered:
            if item is not None:
                self._add(item[0], item[1], item[2])

    def confusion(self, num_labels: int, ignore_index: int, label_map: dict | None, reduce_labels: bool):
        """(intersect, union, pred_area, label_area) per class, exactly as the Hub module counts them."""
        zeros = np.zeros(num_labels, dtype=np.float64)
        if self.counts is None:
            return zeros, zeros.copy(), zeros.copy(), zeros.copy()
        ref_values = np.arange(self.row_offset, self.row_offset + self.counts.shape[0])
        mapped = ref_values.copy()
        if label_map is not None:
            for old_id, new_id in label_map.items():
                mapped[mapped == old_id] = new_id
        if reduce_labels:
            mapped[mapped == 0] = 255
            mapped = mapped - 1
            mapped[mapped == 254] = 255
        pred_values = np.arange(self.col_offset, self.col_offset + self.counts.shape[1])
        counts = self.counts.numpy().astype(np.float64)[mapped != ignore_index]
        mapped = mapped[mapped != ignore_index]
        pred_in = (pred_values >= 0) & (pred_values < num_labels)
        label_in = (mapped >= 0) & (mapped < num_labels)
        label_area = np.bincount(mapped[label_in], weights=counts[label_in].sum(1), minlength=num_labels)
        pred_area = np.bincount(pred_values[pred_in], weights=counts[:, pred_in].sum(0), minlength=num_labels)
        match = (mapped[:, None] == pred_values[None, :]) & label_in[:, None] & pred_in[None, :]
        rows, cols = np.nonzero(match)
        intersect = np.bincount(mapped[rows], weights=counts[rows, cols], minlength=num_labels)
        union = pred_area + label_area - intersect
        return intersect, union, pred_area, label_area


class MeanIoU(evaluate.Metric):
    """Drop-in for the Hub's `mean_iou` (same arguments and outputs), streaming and multi-process."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
            }),
        )

    def _histogram(self) -> JointHistogram:
        if not hasattr(self, "_joint"):
            self._joint = JointHistogram()
        return self._joint

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of prediction / reference maps to the histogram."""
        if predictions is None or references is None:
            raise ValueError("add_batch needs both predictions and references.")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
        histogram = self._histogram()
        for prediction, reference in zip(predictions, references):  # per map: stacking would copy everything
            histogram.update(prediction, reference)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction / reference map to the histogram."""
        self._histogram().update(prediction, reference)

    def compute(self, *, predictions=None, references=None, num_labels: int, ignore_index: int,
                nan_to_num: float | None = None, label_map: dict | None = None, reduce_labels: bool = False,
                **kwargs) -> dict:
        """Mean IoU of everything added (plus `predictions`/`references` if given); see the module description."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        histogram = self._histogram()
        histogram.merge_processes()
        intersect, union, pred_area, label_area = histogram.confusion(num_labels, ignore_index, label_map,
                                                                      reduce_labels)
        self._joint = JointHistogram()  # like the Hub module, compute() consumes what was added
        return self._compute_metrics(intersect, union, label_area, nan_to_num)

    @staticmethod
    def _compute_metrics(intersect, union, label_area, nan_to_num):
        with np.errstate(divide="ignore", invalid="ignore"):
            overall = intersect.sum() / label_area.sum()
            iou = intersect / union
            accuracy = intersect / label_area
        metrics = {
            "mean_iou": np.nanmean(iou) if np.isfinite(iou).any() else np.nan,
            "mean_accuracy": np.nanmean(accuracy) if np.isfinite(accuracy).any() else np.nan,
            "overall_accuracy": overall,
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
        if nan_to_num is not None:
            metrics = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in metrics.items()}
        return metrics

    def _compute(self, *args, **kwargs):  # pragma: no cover - compute() is overridden
        raise NotImplementedError
