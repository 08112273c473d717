"""The batched set-prediction loss: each image scored as it would be alone, and the edge cases of matching."""

import numpy as np
import pytest
import torch

from modeling_mrovseg.loss_mrovseg import MROVSegLoss, class_balanced_points, sample_labels, semantic_targets
from tests.helpers import tiny_config

CLASSES = 12


def labels_for(batch: int, size: int = 48) -> torch.Tensor:
    """Label maps with a few classes each; image 1 has more classes than the 8 queries, image 2 only ignored pixels."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (batch, size, size), generator=generator)
    labels[:, :, :6] = 255
    labels[1] = torch.arange(size)[None].expand(size, -1) % CLASSES  # 12 classes > 8 queries
    labels[2] = 255
    return labels


def logits_for(batch: int, queries: int = 8, size: int = 24, outputs: int = 3):
    generator = torch.Generator().manual_seed(1)
    class_logits = torch.randn(batch, queries, CLASSES + 1, generator=generator, requires_grad=True)
    mask_logits = torch.randn(batch, queries, size, size, generator=generator, requires_grad=True)
    auxiliary = [{"class_queries_logits": class_logits * (k + 2), "masks_queries_logits": mask_logits * (k + 2)}
                 for k in range(outputs - 1)]
    return class_logits, mask_logits, auxiliary


def test_batch_loss_is_the_mean_of_each_image_scored_alone():
    """Seeded per image, the batched loss (one matching and one scoring pass for all images and decoder outputs)
    equals scoring each image on its own, values and gradients."""
    loss = MROVSegLoss(tiny_config(labels=[f"c{i}" for i in range(CLASSES)]))
    labels, seeds = labels_for(4), torch.tensor([11, 12, 13, 14])
    class_logits, mask_logits, auxiliary = logits_for(4)
    total, parts = loss(class_logits, mask_logits, labels, auxiliary, seeds)
    total.backward()
    batched_grads = class_logits.grad.clone(), mask_logits.grad.clone()

    alone_totals, alone_parts = [], []
    class_logits.grad = mask_logits.grad = None
    for b in range(4):
        cls, masks, aux = logits_for(4)
        pick = lambda t: t[b : b + 1]  # noqa: E731
        single, single_parts = loss(pick(cls), pick(masks), pick(labels), [
            {name: pick(value) for name, value in a.items()} for a in aux], seeds[b : b + 1])
        (single / 4).backward()
        alone_totals.append(single.detach())
        alone_parts.append(single_parts)
        grads = cls.grad, masks.grad
        torch.testing.assert_close(grads[0][b], batched_grads[0][b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads[1][b], batched_grads[1][b], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(total.detach(), torch.stack(alone_totals).mean(), rtol=1e-5, atol=1e-6)
    for name in parts:
        torch.testing.assert_close(parts[name], torch.stack([p[name] for p in alone_parts]).mean(), rtol=1e-5,
                                   atol=1e-6)
    assert parts["loss_mask"] > 0 and parts["loss_dice"] > 0


def test_a_batch_without_any_target_still_reaches_every_output():
    loss = MROVSegLoss(tiny_config(labels=[f"c{i}" for i in range(CLASSES)]))
    class_logits, mask_logits, auxiliary = logits_for(2)
    total, parts = loss(class_logits, mask_logits, torch.full((2, 48, 48), 255), auxiliary, torch.tensor([1, 2]))
    total.backward()
    assert torch.isfinite(total) and parts["loss_mask"] == 0 and parts["loss_dice"] == 0
    assert mask_logits.grad is not None and class_logits.grad.abs().sum() > 0  # everything is "no object"


def test_class_ids_outside_the_vocabulary_are_named():
    labels = labels_for(3)
    labels[0, 0, 10], labels[2, 5, 7] = 40, -3
    with pytest.raises(ValueError, match=r"class ids \[-3, 40\] outside the vocabulary of 12 classes"):
        semantic_targets(labels, CLASSES, 255)
    class_ids = semantic_targets(labels_for(3), CLASSES, 255)
    assert [ids.tolist() for ids in class_ids] == [[0, 1, 2], list(range(CLASSES)), []]
    assert all(ids.dtype == np.int64 for ids in class_ids)


def test_a_batch_reads_the_device_three_times(monkeypatch):
    """On a GPU every read to the host waits for the device: the whole batch's classes, all seeds and all cost
    matrices are one read each, whatever the batch size and the number of decoder outputs."""
    reads = []
    for name in ("cpu", "tolist", "item", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: (reads.append(_n), _f(
            self, *a, **k))[1])
    loss = MROVSegLoss(tiny_config(labels=[f"c{i}" for i in range(CLASSES)]))
    class_logits, mask_logits, auxiliary = logits_for(4)
    reads.clear()
    loss(class_logits, mask_logits, labels_for(4), auxiliary, torch.tensor([1, 2, 3, 4]))
    device_reads = [name for name in reads if name != "numpy"]  # .numpy() of tensors already on the host
    assert device_reads == ["cpu", "tolist", "cpu"]


def test_class_balanced_points_give_every_class_an_equal_share():
    label_map = torch.zeros(64, 96, dtype=torch.long)
    label_map[10:12, 20:22] = 3  # 4 pixels of 6144
    label_map[:, -8:] = 255  # ignored
    points = class_balanced_points(label_map, 4000, 255, torch.Generator().manual_seed(0))
    assert points.shape == (4000, 2) and points.min() >= 0 and points.max() <= 1
    ids = sample_labels(label_map[None], torch.zeros(1, dtype=torch.long), points[None])[0]
    assert not (ids == 255).any()
    assert abs((ids == 3).float().mean().item() - 0.5) < 0.05


def test_balanced_share_takes_at_most_what_the_uncertain_points_leave():
    assert MROVSegLoss(tiny_config(train_num_points=100))._point_counts() == (75, 10, 15)
    config = tiny_config(train_num_points=100, importance_sample_ratio=1.0)  # a config saved before the option
    assert MROVSegLoss(config)._point_counts() == (100, 0, 0)
    loss = MROVSegLoss(config)
    class_logits, mask_logits, auxiliary = logits_for(3)
    total, _ = loss(class_logits, mask_logits, labels_for(3), auxiliary, torch.tensor([1, 2, 3]))
    assert torch.isfinite(total)


def test_one_balanced_draw_is_shared_by_every_mask_of_an_image():
    config = tiny_config(train_num_points=400, importance_sample_ratio=0.5, balanced_sample_ratio=0.25)
    loss = MROVSegLoss(config)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :2, :2] = 1  # 4 of 1024 pixels
    labels[1, 10:20, 10:20] = 2
    generators = [torch.Generator().manual_seed(seed) for seed in (5, 6)]
    _, candidates, balanced, uniform = loss._draw_points(1, [2, 3], [2, 3], generators, labels)
    points = loss.importance_points(torch.randn(5, 16, 16), torch.cat(candidates), torch.cat(balanced),
                                    torch.cat(uniform))
    assert points.shape == (5, 400, 2)
    assert torch.equal(points[0, 200:300], points[1, 200:300])  # image 0's two masks
    assert torch.equal(points[2, 200:300], points[4, 200:300])  # image 1's three masks
    assert not torch.equal(points[0, 200:300], points[2, 200:300])
    owners = torch.tensor([0, 1])
    ids = sample_labels(labels, owners, points[[0, 2], 200:300])
    assert 0.35 < (ids[0] == 1).float().mean() < 0.65  # half of image 0's balanced points on its 4-pixel class
    assert 0.2 < (ids[1] == 1).float().mean() < 0.45  # a third each of image 1's three classes


def test_matching_costs_of_a_batch_are_each_image_alone():
    """One output's costs are computed for all images at once; an image's block equals its costs computed alone (to
    float rounding: batched products may sum in another order), and the padding beyond its targets is never read."""
    loss = MROVSegLoss(tiny_config(labels=[f"c{i}" for i in range(CLASSES)]))
    labels = labels_for(4)
    class_logits, mask_logits, _ = logits_for(4)
    class_ids = semantic_targets(labels, CLASSES, 255)
    points = torch.rand(4, 500, 2, generator=torch.Generator().manual_seed(3))
    cost = loss.matcher.cost(class_logits, mask_logits, labels, class_ids, points)
    assert cost.shape == (4, 8, CLASSES)
    for b, ids in enumerate(class_ids):
        alone = loss.matcher.cost(class_logits[b : b + 1], mask_logits[b : b + 1], labels[b : b + 1], [ids],
                                  points[b : b + 1])
        assert alone.shape == (1, 8, max(len(ids), 1))
        torch.testing.assert_close(cost[b, :, : len(ids)], alone[0, :, : len(ids)], rtol=1e-5, atol=1e-6)
    assignments = loss.matcher.assign(cost, class_ids)
    assert [len(rows) for rows, _ in assignments] == [3, 8, 0, 3]  # 12 classes for 8 queries; image 2 has none
