"""The model learns: a tiny MROVSeg overfits one synthetic high-resolution scene, small objects included,
and the single-resolution ablation cannot see the objects that are smaller than a global-view patch."""

import numpy as np
import pytest
import torch

from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegImageProcessor
from processing.synthetic import CLASS_NAMES, SMALL_CLASSES, make_scene
from tests.helpers import tiny_config

# 256 x 512 canvas, 64 px global view: one global patch (8 px) covers 32 x 64 image pixels, the 10 px "car" and
# "sign" squares are far smaller; the 2 x 8 slices see them at full resolution (8 px patches).
IMAGE, LABEL = make_scene(256, 512, seed=3, small_size=10, num_small=16)
SMALL_IDS = [CLASS_NAMES.index(name) for name in SMALL_CLASSES]
LARGE_IDS = [i for i in range(len(CLASS_NAMES)) if i not in SMALL_IDS]

# The seed of the initial weights. What 400 steps on this one image do with the two small classes is chaotic, and
# float-level details (thread count, the order gradients are summed in) decide it (measured 2026-11-26, seeds 0-4 at
# 1 and 2 threads): the red "car" and blue "sign" squares are usually found at full resolution, but one query's mask
# can stay on both colours (each class's IoU 0.0-0.6, their union ~0.85): in 3 of 6 runs before the loss drew a
# class-balanced share of its points (`balanced_sample_ratio`), in 1 of 7 since; one run of each set learned neither.
# So this test asserts what the architecture is for: the large classes learned and the small squares found (the
# union of the small classes) where the single-resolution ablation cannot see them. Telling the small classes apart
# is measured where it is stable, over many scenes: the main job and `python -m benchmarks.fidelity`.
SEED = 1


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    return float((prediction & truth).sum() / max((prediction | truth).sum(), 1))


def train_and_predict(seed: int, steps: int = 400, **overrides) -> np.ndarray:
    torch.manual_seed(seed)
    config = tiny_config(labels=CLASS_NAMES, num_queries=10, train_num_points=2048, **overrides)
    model = MROVSegForOpenVocabSegmentation(config).train()
    processor = MROVSegImageProcessor(slice_size=64, size={"height": 256, "width": 512})
    inputs = processor(IMAGE, segmentation_maps=LABEL, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.inference_mode():
        outputs = model(**inputs)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[LABEL.shape])[0].numpy()


def scores(prediction: np.ndarray) -> dict[str, float]:
    per_class = {name: iou(prediction == c, LABEL == c) for c, name in enumerate(CLASS_NAMES)}
    return {**per_class, "large": float(np.mean([per_class[CLASS_NAMES[c]] for c in LARGE_IDS])),
            "small objects": iou(np.isin(prediction, SMALL_IDS), np.isin(LABEL, SMALL_IDS)),
            "small classes": float(np.mean([per_class[name] for name in SMALL_CLASSES]))}


@pytest.mark.slow
def test_overfits_high_res_scene_and_beats_single_resolution_on_small_objects():
    full = scores(train_and_predict(SEED))
    single = scores(train_and_predict(SEED, use_high_res=False))
    print("multi-resolution", full, "\nsingle-resolution", single)
    assert full["large"] >= 0.95
    assert full["small objects"] >= 0.75
    assert full["small objects"] - single["small objects"] >= 0.3
