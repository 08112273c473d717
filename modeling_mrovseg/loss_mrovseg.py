"""Set-prediction loss: semantic labels -> per-class masks, Hungarian matching, point-sampled mask losses.

A batch reads from the device three times per step, whatever its size and number of decoder outputs: the classes
present in all label maps, the loss seeds, and the cost matrices of every image and output (for scipy's
assignment). On a GPU each read waits for all queued work, so none is per image or per output. The matched masks of
all images and outputs are point-sampled and scored in one pass, each output's matching costs are computed for all
images at once, and the class and mask terms are averaged per image for all outputs together. The values are those of
scoring each image on its own (random points drawn in the same order from the same generators, the same terms) up to
float rounding: sums over a batch may run in another order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .configuration_mrovseg import MROVSegConfig


def semantic_targets(labels: torch.Tensor, num_classes: int, ignore_index: int) -> list[np.ndarray]:
    """The class ids present in each of the semantic maps (B, H, W), on the host (one read for the batch: matching
    runs there); ids outside the vocabulary are an error."""
    batch = labels.shape[0]
    flat = labels.flatten(1)
    valid = flat != ignore_index
    in_vocabulary = (flat >= 0) & (flat < num_classes)
    bins = torch.where(valid & in_vocabulary, flat, num_classes)  # one extra bin for ignored pixels
    present = torch.zeros(batch, num_classes + 1, dtype=torch.int32, device=labels.device)
    present.scatter_(1, bins, 1)
    bad = (valid & ~in_vocabulary).any(dim=1, keepdim=True).int()
    host = torch.cat([present[:, :num_classes], bad], dim=1).cpu()
    if host[:, -1].any():
        ids = torch.unique(flat[valid & ~in_vocabulary]).tolist()
        raise ValueError(
            f"labels contain class ids {ids} outside the vocabulary of {num_classes} classes "
            f"(valid ids are 0..{num_classes - 1}, and {ignore_index} for ignored pixels)."
        )
    return [np.flatnonzero(row[:num_classes].numpy()) for row in host]


def sample_logits(logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (G, Q, H, W) logits at (G, P, 2) points in [0, 1] (x, y) -> (G, Q, P)."""
    grid = (2.0 * points - 1.0)[:, None]
    return F.grid_sample(logits, grid.to(logits.dtype), mode="bilinear", align_corners=False)[:, :, 0]


def sample_logits_per_mask(logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (M, H, W) logits, each at its own (M, P, 2) points -> (M, P)."""
    return sample_logits(logits[:, None], points)[:, 0]


def sample_labels(label_maps: torch.Tensor, owners: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Nearest class ids of (B, H, W) maps at (G, ..., 2) points in [0, 1] (x, y), point set g on map owners[g]."""
    height, width = label_maps.shape[-2:]
    cols = (points[..., 0] * width).long().clamp_(0, width - 1)
    rows = (points[..., 1] * height).long().clamp_(0, height - 1)
    owners = owners.view(-1, *([1] * (points.dim() - 2)))
    return label_maps[owners, rows, cols]


def class_balance_weights(label_map: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(H * W,) sampling weights of an (H, W) label map's pixels: each class present sums to 1, ignored pixels 0."""
    flat = label_map.flatten()
    valid = flat != ignore_index
    ids = torch.where(valid, flat, torch.zeros_like(flat))
    areas = torch.bincount(ids, weights=valid.float())
    return valid.float() / areas[ids].clamp(min=1)


def class_balanced_points(label_map: torch.Tensor, num: int, ignore_index: int,
                          generator: torch.Generator | None = None,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """
    (num, 2) points in [0, 1] (x, y) over an (H, W) label map, every class present equally likely whatever its
    area (ignored pixels never): small classes then get points both as positives of their own mask and as
    negatives of the others'. On the device, no host read; the map must hold at least one labelled pixel.
    `weights`: the map's `class_balance_weights`, when drawing from it more than once.
    """
    height, width = label_map.shape
    if weights is None:
        weights = class_balance_weights(label_map, ignore_index)
    index = torch.multinomial(weights, num, replacement=True, generator=generator)
    jitter = torch.rand(num, 2, device=label_map.device, generator=generator)
    return torch.stack([(index % width + jitter[:, 0]) / width, (index // width + jitter[:, 1]) / height], dim=-1)


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., Q, P) logits vs (..., M, P) targets over valid (..., P) points -> (..., Q, M) mean BCE."""
    point_weight = weight.unsqueeze(-2)
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none") * point_weight
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * point_weight
    return (pos @ targets.mT + neg @ (1 - targets).mT) / weight.sum(-1).clamp(min=1)[..., None, None]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., Q, P) logits vs (..., M, P) targets over valid (..., P) points -> (..., Q, M) dice loss."""
    point_weight = weight.unsqueeze(-2)
    probs = logits.sigmoid() * point_weight
    numerator = 2 * probs @ targets.mT
    denominator = probs.sum(-1)[..., :, None] + (targets * point_weight).sum(-1)[..., None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class MROVSegHungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth class masks (scipy's `linear_sum_assignment`)."""

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        self.class_weight = config.class_weight
        self.mask_weight = config.mask_weight
        self.dice_weight = config.dice_weight
        self.ignore_index = config.ignore_index

    @torch.no_grad()
    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, label_maps: torch.Tensor,
                class_ids: list[np.ndarray], points: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """
        All images of one decoder output: (B, N, C + 1) class logits, (B, N, H, W) mask logits, (B, H, W) label maps,
        each image's target class ids and (B, P, 2) sampled points -> per image (query indices, target indices).
        """
        return self.assign(self.cost(class_logits, mask_logits, label_maps, class_ids, points).cpu(), class_ids)

    @staticmethod
    def assign(cost: torch.Tensor, class_ids: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(B, N, M) host costs (padded beyond each image's targets) -> per image (query indices, target indices)."""
        cost = np.nan_to_num(cost.numpy(), nan=1e6)
        empty = np.zeros(0, dtype=np.int64)
        return [linear_sum_assignment(cost[b, :, : len(ids)]) if len(ids) else (empty, empty)
                for b, ids in enumerate(class_ids)]

    @torch.no_grad()
    def cost(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, label_maps: torch.Tensor,
             class_ids: list[np.ndarray], points: torch.Tensor) -> torch.Tensor:
        """
        The (B, N, M) matching costs of every image at once, on the device; M is the most targets of an image, and
        an image's columns beyond its own targets (padded with class 0) are never read.
        """
        batch, num_queries = class_logits.shape[:2]
        device = class_logits.device
        padded = np.zeros((batch, max([len(ids) for ids in class_ids] + [1])), dtype=np.int64)
        for b, ids in enumerate(class_ids):
            padded[b, : len(ids)] = ids
        ids = torch.from_numpy(padded).to(device)  # a copy to the device: no wait for it
        sampled = sample_labels(label_maps, torch.arange(batch, device=device), points)  # (B, P)
        weight = (sampled != self.ignore_index).float()
        target_masks = (sampled[:, None] == ids[:, :, None]).float()  # (B, M, P)
        pred = sample_logits(mask_logits.float(), points)  # (B, N, P)
        probs = class_logits.float().softmax(-1)
        return (
            -self.class_weight * probs.gather(2, ids[:, None].expand(-1, num_queries, -1))
            + self.mask_weight * pairwise_bce(pred, target_masks, weight)
            + self.dice_weight * pairwise_dice(pred, target_masks, weight)
        )


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

    def _point_counts(self) -> tuple[int, int, int]:
        """Uncertain, class-balanced and uniform points per mask (the balanced share takes at most what is left)."""
        total = self.config.train_num_points
        uncertain = int(self.config.importance_sample_ratio * total)
        balanced = min(int(self.config.balanced_sample_ratio * total), total - uncertain)
        return uncertain, balanced, total - uncertain - balanced

    def _draw_points(self, num_outputs: int, counts: list[int], matched: list[int], generators: list,
                     labels: torch.Tensor):
        """Every random point of the step, in the order of scoring each output, image by image: the matcher's
        points (B, P, 2) per output, then each image's importance candidates, class-balanced points (one draw shared
        by its masks) and uniform points per matched mask."""
        config = self.config
        device = labels.device
        total = config.train_num_points
        oversampled = int(total * config.oversample_ratio)
        _, num_balanced, num_uniform = self._point_counts()
        match_points, candidates, balanced, uniform = [], [], [], []
        weights = [class_balance_weights(labels[b], config.ignore_index) if num and num_balanced else None
                   for b, num in enumerate(matched)]  # each map's, for the draws of every output
        for _ in range(num_outputs):
            points = torch.zeros(len(counts), total, 2, device=device)  # images without targets: unused zeros
            for b, (count, num, generator) in enumerate(zip(counts, matched, generators)):
                if count:
                    points[b] = torch.rand(total, 2, device=device, generator=generator)
                if num:
                    candidates.append(torch.rand(num, oversampled, 2, device=device, generator=generator))
                    if num_balanced:
                        drawn = class_balanced_points(labels[b], num_balanced, config.ignore_index, generator,
                                                      weights[b])
                        balanced.append(drawn[None].expand(num, -1, -1))
                    uniform.append(torch.rand(num, num_uniform, 2, device=device, generator=generator))
            match_points.append(points)
        return match_points, candidates, balanced, uniform

    def importance_points(self, logits: torch.Tensor, candidates: torch.Tensor, balanced: torch.Tensor | None,
                          uniform: torch.Tensor) -> torch.Tensor:
        """
        (M, H, W) logits -> (M, P, 2) points: the most uncertain of the candidates, the class-balanced ones
        (`balanced_sample_ratio`), then the uniform ones. Uncertain points alone miss confidently wrong regions,
        such as one small class's mask firing on another.
        """
        with torch.no_grad():
            values = sample_logits_per_mask(logits.detach().float(), candidates)
        top = (-values.abs()).topk(self._point_counts()[0], dim=1).indices
        uncertain = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
        return torch.cat([uncertain] + ([] if balanced is None else [balanced]) + [uniform], dim=1)

    def forward(self, class_logits, mask_logits, labels: torch.Tensor, auxiliary=None,
                seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Total loss over the final and auxiliary outputs, averaged over images, plus the final output's terms."""
        config = self.config
        device = class_logits.device
        batch, num_queries, num_logits = class_logits.shape
        num_classes = num_logits - 1
        class_ids = semantic_targets(labels, num_classes, config.ignore_index)
        outputs = [(class_logits, mask_logits)] + [
            (a["class_queries_logits"], a["masks_queries_logits"]) for a in auxiliary or []
        ]
        num_outputs = len(outputs)
        generators = [None] * batch
        if seeds is not None:
            generators = [torch.Generator(device=device).manual_seed(seed) for seed in torch.as_tensor(seeds).tolist()]
        counts = [len(ids) for ids in class_ids]
        matched = [min(count, num_queries) for count in counts]
        match_points, candidates, balanced, uniform = self._draw_points(num_outputs, counts, matched, generators,
                                                                         labels)

        # 1. Hungarian matching: the cost matrices of every output and image come to the host in one copy
        target_classes = np.full((num_outputs, batch, num_queries), num_classes, dtype=np.int64)
        mask_index = {"output": [], "image": [], "query": [], "class": []}
        costs = torch.stack([self.matcher.cost(cls, masks, labels, class_ids, points)
                             for (cls, masks), points in zip(outputs, match_points)]).cpu() if any(counts) else []
        for k, cost in enumerate(costs):
            for b, (rows, cols) in enumerate(self.matcher.assign(cost, class_ids)):
                target_classes[k, b, rows] = class_ids[b][cols]
                if not len(rows):
                    continue
                for name, values in (("output", k), ("image", b), ("query", rows), ("class", class_ids[b][cols])):
                    mask_index[name].append(np.broadcast_to(values, rows.shape))

        # 2. Class loss: matched queries take their class, the others "no object" (each image's weighted mean)
        target_classes = torch.from_numpy(target_classes).to(device)
        class_weights = torch.ones(num_classes + 1, device=device)
        class_weights[-1] = config.no_object_weight
        all_class = torch.stack([cls for cls, _ in outputs]).float()  # (K, B, N, C + 1)
        weighted = F.cross_entropy(all_class.flatten(0, 2), target_classes.flatten(), class_weights, reduction="none")
        loss_class = weighted.view(num_outputs, batch, -1).sum(-1) / class_weights[target_classes].sum(-1)  # (K, B)

        # 3. Mask losses on importance-sampled points of all matched masks at once, then each image's mean
        zero = sum(masks.sum() for _, masks in outputs) * 0.0  # images without targets: zero, still connected
        loss_mask = loss_dice = zero.expand(num_outputs, batch)
        if mask_index["query"]:
            index = {name: torch.from_numpy(np.concatenate(values)).to(device) for name, values in mask_index.items()}
            logits = torch.cat([masks[index["image"][index["output"] == k], index["query"][index["output"] == k]]
                                for k, (_, masks) in enumerate(outputs)]).float()
            points = self.importance_points(logits, torch.cat(candidates), torch.cat(balanced) if balanced else None,
                                            torch.cat(uniform))
            pred = sample_logits_per_mask(logits, points)
            ids = sample_labels(labels, index["image"], points)
            truth = (ids == index["class"][:, None]).float()
            weight = (ids != config.ignore_index).float()
            bce = F.binary_cross_entropy_with_logits(pred, truth, reduction="none")
            per_mask_bce = (bce * weight).sum(-1) / weight.sum(-1).clamp(min=1)
            probs = pred.sigmoid() * weight
            per_mask_dice = 1 - (2 * (probs * truth).sum(-1) + 1) / (probs.sum(-1) + (truth * weight).sum(-1) + 1)
            owner = index["output"] * batch + index["image"]  # each mask's (output, image), flattened
            masks_per_owner = torch.bincount(owner, minlength=num_outputs * batch).clamp(min=1)

            def owner_mean(per_mask: torch.Tensor) -> torch.Tensor:
                summed = per_mask.new_zeros(num_outputs * batch).index_add(0, owner, per_mask)
                return zero + (summed / masks_per_owner).view(num_outputs, batch)

            loss_mask, loss_dice = owner_mean(per_mask_bce), owner_mean(per_mask_dice)

        # each output: the mean of its images' terms; the outputs' weighted terms summed
        terms = {"loss_class": loss_class.mean(-1), "loss_mask": loss_mask.mean(-1), "loss_dice": loss_dice.mean(-1)}
        total = (config.class_weight * terms["loss_class"] + config.mask_weight * terms["loss_mask"]
                 + config.dice_weight * terms["loss_dice"]).sum()
        return total, {name: value[0].detach() for name, value in terms.items()}
