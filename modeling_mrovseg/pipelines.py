"""`pipeline("zero-shot-image-segmentation")`: label every pixel with class names chosen per call.

The stock `pipeline("image-segmentation")` already works on the vocabulary stored in a checkpoint; this one
takes `candidate_labels` (a list, where one entry may carry synonyms as "sofa, couch", or a comma-separated
string of single names). Text embeddings are cached per (labels, templates), so a folder of images with one
vocabulary runs the text encoder once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .text_classifier import validate_labels


def parse_candidate_labels(candidate_labels: str | Sequence[str] | None, fallback: Sequence[str]) -> list[str]:
    """A list is taken as is (entries may hold synonyms); a string is split on commas; None means `fallback`."""
    if candidate_labels is None:
        return list(fallback)
    if isinstance(candidate_labels, str):
        candidate_labels = [name for name in (part.strip() for part in candidate_labels.split(",")) if name]
    return validate_labels(list(candidate_labels))


class MROVSegZeroShotSegmentationPipeline(Pipeline):
    """
    Example:

    ```python
    >>> from transformers import pipeline
    >>> import modeling_mrovseg  # registers the task
    >>> segmenter = pipeline("zero-shot-image-segmentation", model="path/or/hub-id")
    >>> result = segmenter("street.jpg", candidate_labels=["road", "cyclist", "traffic cone"])
    >>> [(segment["label"], round(segment["score"], 2)) for segment in result["segments"]]
    ```

    Returns per image a dict: `segments` (one `{"label", "score", "mask"}` per class present, largest first;
    `score` is the mean class probability inside the mask, `mask` a PIL "L" image), `label_map` (H x W int64
    array of indices into `labels`, -1 where `score_threshold` left a pixel unlabelled) and `labels`.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, text_cache_size: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.text_cache_hits = 0
        self.text_cache_misses = 0

    def _sanitize_parameters(self, candidate_labels=None, score_threshold=None, timeout=None, **kwargs):
        preprocess, postprocess = {}, {}
        if candidate_labels is not None:
            preprocess["candidate_labels"] = candidate_labels
        if timeout is not None:
            preprocess["timeout"] = timeout
        if score_threshold is not None:
            postprocess["score_threshold"] = score_threshold
        return preprocess, {}, postprocess

    def text_embeddings(self, labels: list[str]) -> torch.Tensor:
        """(C, P) embeddings of `labels`, computed once per (labels, templates) and then served from a cache."""
        key = (tuple(labels), tuple(self.model.config.prompt_templates))
        if key in self._text_cache:
            self.text_cache_hits += 1
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        self.text_cache_misses += 1
        if list(labels) == self.model.vocabulary:
            embeds = self.model.vocabulary_embeds
        else:
            if self.tokenizer is None:
                raise ValueError("New candidate_labels need the CLIP tokenizer: pass `tokenizer=` to the pipeline.")
            embeds = self.model.embed_class_names(labels, self.tokenizer)
        self._text_cache[key] = embeds
        if len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return embeds

    def preprocess(self, image, candidate_labels=None, timeout=None):
        labels = parse_candidate_labels(candidate_labels, self.model.vocabulary)
        image = load_image(image, timeout=timeout)
        inputs = self.image_processor(images=[image], return_tensors="pt")
        inputs = inputs.to(self.dtype)
        return {**inputs, "text_embeds": self.text_embeddings(labels), "target_size": [(image.height, image.width)],
                "candidate_labels": labels}

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        labels = model_inputs.pop("candidate_labels")
        outputs = self.model(**model_inputs)
        return {"outputs": outputs, "target_size": target_size, "candidate_labels": labels}

    def postprocess(self, model_outputs, score_threshold=None):
        labels = model_outputs["candidate_labels"]
        result = self.image_processor.post_process_semantic_segmentation(
            model_outputs["outputs"], target_sizes=model_outputs["target_size"], return_segmentation_scores=True,
            score_threshold=score_threshold,
        )[0]
        label_map = result.segmentation.cpu().numpy().astype(np.int64)
        scores = result.segmentation_scores.float().cpu().clamp(min=0)
        probs = scores / scores.sum(dim=0, keepdim=True).clamp(min=1e-6)  # each class's share of the evidence
        segments = []
        for index in np.unique(label_map):
            if index < 0:
                continue
            mask = label_map == index
            score = float(probs[int(index)][torch.from_numpy(mask)].mean())
            segments.append({"label": labels[int(index)], "score": score,
                             "mask": Image.fromarray(mask.astype(np.uint8) * 255, mode="L"),
                             "pixels": int(mask.sum())})
        segments.sort(key=lambda s: -s["pixels"])
        return {"segments": segments, "label_map": label_map, "labels": labels}


def register_pipelines() -> None:
    from transformers import AutoModelForSemanticSegmentation
    from transformers.pipelines import PIPELINE_REGISTRY

    if "zero-shot-image-segmentation" not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            "zero-shot-image-segmentation",
            pipeline_class=MROVSegZeroShotSegmentationPipeline,
            pt_model=AutoModelForSemanticSegmentation,
            type="multimodal",
        )


__all__ = ["MROVSegZeroShotSegmentationPipeline", "parse_candidate_labels", "register_pipelines"]
