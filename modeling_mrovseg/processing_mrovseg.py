"""MROVSegProcessor: the image processor plus CLIP's tokenizer, whose `text=` takes class names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_mrovseg import VILD_TEMPLATES
from .text_classifier import build_prompts, parse_class_names, tokenize_prompts


TOKENIZER_KWARGS = ("padding", "truncation", "max_length")


class MROVSegProcessor(ProcessorMixin):
    r"""
    Wraps [`MROVSegImageProcessor`] and a CLIP tokenizer. `text=` is a list of class names (a name may carry
    synonyms, `"sofa, couch"`) or a string of them, read as the pipelines read it; every name is put into every
    prompt template and tokenized, and `text_prompt_owners` (T x 2: class index, synonym index) tells the model how
    to pool the prompts back into one embedding per class. `padding`, `truncation` and `max_length` (CLIPSeg's
    processor takes them) are accepted and change nothing: prompts are always padded and cut at CLIP's context.

    Example:

    ```python
    >>> processor = MROVSegProcessor(image_processor, tokenizer)
    >>> inputs = processor(images=image, text=["sky", "road", "sofa, couch"], return_tensors="pt")
    >>> outputs = model(**inputs)
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, prompt_templates: Sequence[str] | None = None, **kwargs):
        if image_processor is not None and getattr(image_processor, "slice_size", None) is None:
            # from_pretrained(a CLIP folder) loaded CLIP's processor: 224 px centre crops, no slices, and the model
            # then ran its single-resolution ablation on them, its masks stretched over the uncropped image
            raise ValueError(f"MROVSegProcessor needs MROVSeg's image processor, got {type(image_processor).__name__} "
                             "(another model's, such as a CLIP folder's): build it with "
                             "MROVSegProcessor.from_model_config(model.config, tokenizer) or load it from an MROVSeg "
                             "checkpoint.")
        self.prompt_templates = list(prompt_templates or VILD_TEMPLATES)
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_model_config(cls, config, tokenizer, **image_processor_kwargs) -> "MROVSegProcessor":
        """The processor of a model: its slice geometry and its prompt templates (the config owns both)."""
        from .image_processing_mrovseg import MROVSegImageProcessor

        return cls(MROVSegImageProcessor.from_model_config(config, **image_processor_kwargs), tokenizer,
                   prompt_templates=config.prompt_templates)

    def __call__(self, images=None, text: str | Sequence[str] | None = None, segmentation_maps=None,
                 return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("Give `images`, `text` (class names) or both.")
        # the tokenizer's settings as CLIPSeg's processor takes them (`padding=True`): prompts are always padded to
        # the longest and truncated to CLIP's context, so they change nothing; given to the image processor they
        # were a TypeError about its own keyword arguments
        for name in TOKENIZER_KWARGS:
            kwargs.pop(name, None)
        data = {}
        if images is not None:
            data.update(self.image_processor(images, segmentation_maps=segmentation_maps, return_tensors=return_tensors,
                                             **kwargs))
        if text is not None:
            data.update(self.tokenize_class_names(text))
        return BatchFeature(data=data)

    def tokenize_class_names(self, labels: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (T x L) for all template x synonym prompts, and their (class, synonym) owners."""
        labels = parse_class_names(labels, allow_files=False)  # as the pipelines read them: "sky, road" too
        prompts, owners = build_prompts(labels, self.prompt_templates)
        return {**tokenize_prompts(self.tokenizer, prompts), "text_prompt_owners": torch.tensor(owners, dtype=torch.long)}

    def post_process_semantic_segmentation(self, *args, **kwargs):
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.image_processor.model_input_names) + ["input_ids", "attention_mask", "text_prompt_owners"]


__all__ = ["MROVSegProcessor"]
