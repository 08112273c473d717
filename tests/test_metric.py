"""The streaming metric against a plain per-image implementation of the Hub's `mean_iou` formulas."""


import evaluate
import numpy as np
import pytest
import torch

from modeling_mrovseg import MEAN_IOU as METRIC_PATH


def reference_mean_iou(predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                       reduce_labels=False):
    """Written from the Hub module's definition: per-image histograms, summed, then the ratios."""
    total = np.zeros((4, num_labels))
    for pred, label in zip(predictions, references):
        pred, label = np.array(pred), np.array(label).copy()
        if label_map is not None:
            for old_id, new_id in label_map.items():
                label[label == old_id] = new_id
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        hist = [np.histogram(x, bins=num_labels, range=(0, num_labels - 1))[0] for x in (intersect, pred, label)]
        total += np.stack([hist[0], hist[1], hist[2], hist[1] + hist[2] - hist[0]])
    intersect, pred_area, label_area, union = total
    with np.errstate(divide="ignore", invalid="ignore"):
        metrics = {"mean_iou": np.nanmean(intersect / union), "mean_accuracy": np.nanmean(intersect / label_area),
                   "overall_accuracy": intersect.sum() / label_area.sum(), "per_category_iou": intersect / union,
                   "per_category_accuracy": intersect / label_area}
    if nan_to_num is not None:
        metrics = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in metrics.items()}
    return metrics


def assert_same(ours, theirs):
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-12, equal_nan=True, err_msg=key)


def random_maps(seed, count=6, num_labels=7, size=(23, 31), label_values=None):
    rng = np.random.default_rng(seed)
    preds = [rng.integers(0, num_labels + 1, size) for _ in range(count)]  # includes out-of-range predictions
    labels = [rng.integers(0, label_values or num_labels, size).astype(np.uint8) for _ in range(count)]
    for label in labels:
        label[rng.random(size) < 0.1] = 255
    return preds, labels


@pytest.mark.parametrize("kwargs", [
    {}, {"nan_to_num": 0.0}, {"reduce_labels": True}, {"label_map": {1: 3, 3: 1, 5: 255}},
    {"label_map": {2: 4}, "reduce_labels": True, "nan_to_num": -1.0},
])
def test_matches_reference(kwargs):
    preds, labels = random_maps(0)
    metric = evaluate.load(METRIC_PATH)
    for i in range(0, len(preds), 2):  # streamed in batches
        metric.add_batch(predictions=preds[i : i + 2], references=labels[i : i + 2])
    ours = metric.compute(num_labels=7, ignore_index=255, **kwargs)
    assert_same(ours, reference_mean_iou(preds, labels, 7, 255, **kwargs))


def test_absent_classes_and_inputs_of_any_kind():
    preds, labels = random_maps(1, num_labels=10, label_values=4)  # classes 4..9 never in the references
    metric = evaluate.load(METRIC_PATH)
    ours = metric.compute(predictions=[torch.as_tensor(p) for p in preds], references=[lab.tolist() for lab in labels],
                          num_labels=10, ignore_index=255)
    theirs = reference_mean_iou(preds, labels, 10, 255)
    assert_same(ours, theirs)
    assert np.isnan(ours["per_category_accuracy"][5]) and ours["per_category_iou"][5] == 0.0


def test_compute_consumes_and_mismatch_errors():
    metric = evaluate.load(METRIC_PATH)
    metric.add(prediction=np.zeros((4, 4), int), reference=np.zeros((4, 4), int))
    assert metric.compute(num_labels=2, ignore_index=255)["mean_iou"] == 1.0
    assert np.isnan(metric.compute(num_labels=2, ignore_index=255)["mean_iou"])
    with pytest.raises(ValueError, match=r"shape \(4, 4\) but reference has shape \(4, 5\)"):
        metric.add(prediction=np.zeros((4, 4), int), reference=np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="shape"):  # same pixel count, transposed: an error, not a score
        metric.add(prediction=np.zeros((6, 4), int), reference=np.zeros((4, 6), int))


def test_metric_loads_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metric = evaluate.load(METRIC_PATH)
    assert metric.compute(predictions=[np.eye(3, dtype=int)], references=[np.eye(3, dtype=int)], num_labels=2,
                          ignore_index=255)["mean_iou"] == 1.0
