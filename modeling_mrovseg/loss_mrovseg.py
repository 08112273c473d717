"""Set-prediction loss: semantic labels -> per-class masks, Hungarian matching, point-sampled mask losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .configuration_mrovseg import MROVSegConfig


@dataclass
class SemanticTargets:
    """One image's targets: class ids (M,) present in its label map, and the map itself (H, W)."""

    class_ids: torch.Tensor
    label_map: torch.Tensor


def semantic_targets(labels: torch.Tensor, num_classes: int, ignore_index: int) -> list[SemanticTargets]:
    """Split semantic maps (B, H, W) into the classes each image contains; ids outside the vocabulary are an error."""
    targets = []
    for label_map in labels:
        ids = torch.unique(label_map)
        ids = ids[ids != ignore_index]
        if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(
                f"labels contain class ids {ids.tolist()} but the vocabulary has {num_classes} classes "
                f"(valid ids are 0..{num_classes - 1}, and {ignore_index} for ignored pixels)."
            )
        targets.append(SemanticTargets(ids.long(), label_map))
    return targets


def sample_logits(logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (Q, H, W) logits at (P, 2) points in [0, 1] (x, y) -> (Q, P)."""
    grid = (2.0 * points - 1.0)[None, None]
    return F.grid_sample(logits[None], grid.to(logits.dtype), mode="bilinear", align_corners=False)[0, :, 0]


def sample_logits_per_mask(logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (M, H, W) logits, each at its own (M, P, 2) points -> (M, P)."""
    grid = (2.0 * points - 1.0)[:, None]
    return F.grid_sample(logits[:, None], grid.to(logits.dtype), mode="bilinear", align_corners=False)[:, 0, 0]


def sample_labels(label_map: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Nearest class id of an (H, W) map at (..., 2) points in [0, 1] (x, y) -> (...)."""
    height, width = label_map.shape
    cols = (points[..., 0] * width).long().clamp_(0, width - 1)
    rows = (points[..., 1] * height).long().clamp_(0, height - 1)
    return label_map[rows, cols]


def class_balanced_points(label_map: torch.Tensor, num: int, ignore_index: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """
    (num, 2) points in [0, 1] (x, y) over an (H, W) label map, every class present equally likely whatever its
    area (ignored pixels never): small classes then get points both as positives of their own mask and as
    negatives of the others'. On the device, no host read; the map must hold at least one labelled pixel.
    """
    height, width = label_map.shape
    flat = label_map.flatten()
    valid = flat != ignore_index
    ids = torch.where(valid, flat, torch.zeros_like(flat))
    areas = torch.bincount(ids, weights=valid.float())
    index = torch.multinomial(valid.float() / areas[ids].clamp(min=1), num, replacement=True, generator=generator)
    jitter = torch.rand(num, 2, device=label_map.device, generator=generator)
    return torch.stack([(index % width + jitter[:, 0]) / width, (index // width + jitter[:, 1]) / height], dim=-1)


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits vs (M, P) targets over valid points -> (Q, M) mean BCE."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none") * weight
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * weight
    return (pos @ targets.T + neg @ (1 - targets).T) / weight.sum().clamp(min=1)


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    probs = logits.sigmoid() * weight
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + (targets * weight).sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class MROVSegHungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth class masks (scipy's `linear_sum_assignment`)."""

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        self.class_weight = config.class_weight
        self.mask_weight = config.mask_weight
        self.dice_weight = config.dice_weight
        self.num_points = config.train_num_points
        self.ignore_index = config.ignore_index

    @torch.no_grad()
    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, target: SemanticTargets,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: (N, C + 1) class logits, (N, H, W) mask logits -> matched (query indices, target indices)."""
        device = class_logits.device
        if target.class_ids.numel() == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return empty, empty
        points = torch.rand(self.num_points, 2, device=mask_logits.device, generator=generator)
        sampled_ids = sample_labels(target.label_map, points)
        weight = (sampled_ids != self.ignore_index).float()
        target_masks = (sampled_ids[None] == target.class_ids[:, None]).float()
        pred = sample_logits(mask_logits.float(), points)
        cost = (
            -self.class_weight * class_logits.float().softmax(-1)[:, target.class_ids]
            + self.mask_weight * pairwise_bce(pred, target_masks, weight)
            + self.dice_weight * pairwise_dice(pred, target_masks, weight)
        )
        rows, cols = linear_sum_assignment(np.nan_to_num(cost.cpu().numpy(), nan=1e6))
        return torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)


class MROVSegLoss(nn.Module):
    """
    Weighted CE (no-object down-weighted) + BCE + dice on importance-sampled points, for every decoder output.

    Every image contributes the mean of its own terms, so a batch split across processes (gradients averaged)
    trains exactly like the whole batch in one process. Point sampling can be seeded per image (`seeds`),
    which makes the loss independent of batch composition, process count and resumption.
    """

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        self.config = config
        self.matcher = MROVSegHungarianMatcher(config)

    def importance_points(self, logits: torch.Tensor, generator: torch.Generator | None = None,
                          label_map: torch.Tensor | None = None) -> torch.Tensor:
        """
        (M, H, W) logits -> (M, P, 2) points: mostly where the prediction is most uncertain; with `label_map`, a
        share (`balanced_sample_ratio`, at most what the uncertain ones leave) drawn class-balanced from it, the
        same for every mask; the rest uniform. Uncertain points alone miss confidently wrong regions, such as one
        small class's mask firing on another.
        """
        config = self.config
        num, total = logits.shape[0], config.train_num_points
        candidates = torch.rand(num, int(total * config.oversample_ratio), 2, device=logits.device, generator=generator)
        with torch.no_grad():
            values = sample_logits_per_mask(logits.detach().float(), candidates)
        num_uncertain = int(config.importance_sample_ratio * total)
        top = (-values.abs()).topk(num_uncertain, dim=1).indices
        parts = [torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))]
        num_balanced = 0 if label_map is None else min(int(config.balanced_sample_ratio * total), total - num_uncertain)
        if num_balanced:
            balanced = class_balanced_points(label_map, num_balanced, config.ignore_index, generator)
            parts.append(balanced[None].expand(num, -1, -1))
        parts.append(torch.rand(num, total - num_uncertain - num_balanced, 2, device=logits.device,
                                generator=generator))
        return torch.cat(parts, dim=1)

    def image_loss(self, class_logits, mask_logits, target: SemanticTargets, generator=None) -> dict[str, torch.Tensor]:
        """Loss terms of one image: (N, C + 1) class logits and (N, H, W) mask logits."""
        config = self.config
        num_classes = class_logits.shape[-1] - 1
        rows, cols = self.matcher(class_logits, mask_logits, target, generator)
        target_classes = torch.full(class_logits.shape[:1], num_classes, dtype=torch.long, device=class_logits.device)
        target_classes[rows] = target.class_ids[cols]
        class_weights = torch.ones(num_classes + 1, device=class_logits.device)
        class_weights[-1] = config.no_object_weight
        loss_class = F.cross_entropy(class_logits.float(), target_classes, class_weights)
        if not rows.numel():
            zero = mask_logits.sum() * 0.0
            return {"loss_class": loss_class, "loss_mask": zero, "loss_dice": zero}
        logits = mask_logits[rows].float()
        points = self.importance_points(logits, generator, target.label_map)
        pred = sample_logits_per_mask(logits, points)
        ids = sample_labels(target.label_map, points)
        truth = (ids == target.class_ids[cols][:, None]).float()
        weight = (ids != config.ignore_index).float()
        bce = F.binary_cross_entropy_with_logits(pred, truth, reduction="none")
        loss_mask = ((bce * weight).sum(-1) / weight.sum(-1).clamp(min=1)).mean()
        probs = pred.sigmoid() * weight
        dice = 1 - (2 * (probs * truth).sum(-1) + 1) / (probs.sum(-1) + (truth * weight).sum(-1) + 1)
        return {"loss_class": loss_class, "loss_mask": loss_mask, "loss_dice": dice.mean()}

    def forward(self, class_logits, mask_logits, labels: torch.Tensor, auxiliary=None,
                seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Total loss over the final and auxiliary outputs, averaged over images, plus the final output's terms."""
        config = self.config
        targets = semantic_targets(labels, class_logits.shape[-1] - 1, config.ignore_index)
        outputs = [(class_logits, mask_logits)] + [
            (a["class_queries_logits"], a["masks_queries_logits"]) for a in auxiliary or []
        ]
        generators = [None] * len(targets)
        if seeds is not None:
            generators = [torch.Generator(device=class_logits.device).manual_seed(int(seed)) for seed in seeds]
        total, parts = 0.0, {}
        for k, (cls, masks) in enumerate(outputs):
            terms = [self.image_loss(cls[b], masks[b], targets[b], generators[b]) for b in range(len(targets))]
            losses = {name: torch.stack([t[name] for t in terms]).mean() for name in terms[0]}
            total = total + (
                config.class_weight * losses["loss_class"]
                + config.mask_weight * losses["loss_mask"]
                + config.dice_weight * losses["loss_dice"]
            )
            if k == 0:
                parts = {name: value.detach() for name, value in losses.items()}
        return total, parts
