"""The set-prediction loss's point sampling."""

import torch

from modeling_mrovseg.loss_mrovseg import MROVSegLoss, class_balanced_points, sample_labels
from tests.helpers import tiny_config


def test_class_balanced_points_give_every_class_an_equal_share():
    label_map = torch.zeros(64, 96, dtype=torch.long)
    label_map[10:12, 20:22] = 3  # 4 pixels of 6144
    label_map[:, -8:] = 255  # ignored
    points = class_balanced_points(label_map, 4000, 255, torch.Generator().manual_seed(0))
    assert points.shape == (4000, 2) and points.min() >= 0 and points.max() <= 1
    ids = sample_labels(label_map, points)
    assert not (ids == 255).any()
    assert abs((ids == 3).float().mean().item() - 0.5) < 0.05


def test_balanced_share_of_the_loss_points():
    config = tiny_config(train_num_points=400, importance_sample_ratio=0.5, balanced_sample_ratio=0.25)
    loss = MROVSegLoss(config)
    label_map = torch.zeros(32, 32, dtype=torch.long)
    label_map[:2, :2] = 1
    points = loss.importance_points(torch.randn(3, 16, 16), torch.Generator().manual_seed(0), label_map)
    assert points.shape == (3, 400, 2)
    assert torch.equal(points[0, 200:300], points[2, 200:300])  # one class-balanced draw shared by every mask
    assert 0.35 < (sample_labels(label_map, points[0, 200:300]) == 1).float().mean() < 0.65  # 4 of 1024 pixels


def test_balanced_share_takes_at_most_what_the_uncertain_points_leave():
    config = tiny_config(train_num_points=100, importance_sample_ratio=1.0)  # a config saved before the option
    points = MROVSegLoss(config).importance_points(torch.randn(2, 8, 8), None, torch.zeros(8, 8, dtype=torch.long))
    assert points.shape == (2, 100, 2)
