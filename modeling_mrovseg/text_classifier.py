"""Open-vocabulary classification: class names -> prompt-ensembled CLIP text embeddings -> cosine logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def split_synonyms(label: str) -> list[str]:
    """`"sofa, couch"` -> `["sofa", "couch"]`; each synonym is embedded and the embeddings averaged."""
    if not isinstance(label, str):
        raise ValueError(f"Class names must be strings, got {type(label).__name__}: {label!r}.")
    synonyms = [name.strip() for name in label.split(",") if name.strip()]
    if not synonyms:
        raise ValueError(f"Class name {label!r} is empty.")
    return synonyms


def validate_labels(labels: Sequence[str]) -> list[str]:
    """Reject an empty vocabulary and duplicated class names (which would make argmax ambiguous)."""
    if isinstance(labels, str):
        raise ValueError("Pass the vocabulary as a list of class names, not a single string.")
    labels = [str(label).strip() if isinstance(label, str) else label for label in labels]
    if not labels:
        raise ValueError("The vocabulary is empty: give at least one class name.")
    for label in labels:
        split_synonyms(label)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        key = label.lower()
        if key in seen:
            raise ValueError(f"Duplicate class name {label!r} at positions {seen[key]} and {i}.")
        seen[key] = i
    return labels


def build_prompts(labels: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """All template x synonym prompts, and for each its (class index, synonym index)."""
    prompts, owners = [], []
    for class_index, label in enumerate(labels):
        for synonym_index, synonym in enumerate(split_synonyms(label)):
            for template in templates:
                prompts.append(template.format(synonym))
                owners.append((class_index, synonym_index))
    return prompts, owners


def pool_prompt_embeddings(embeds: torch.Tensor, owners: list[tuple[int, int]], num_classes: int) -> torch.Tensor:
    """Average normalised prompt embeddings over templates, then over synonyms; (P, D) -> (C, D), unit norm."""
    embeds = F.normalize(embeds.float(), dim=-1)
    synonym_keys = sorted(set(owners))
    key_index = {key: i for i, key in enumerate(synonym_keys)}
    index = torch.tensor([key_index[o] for o in owners], device=embeds.device)
    per_synonym = torch.zeros(len(synonym_keys), embeds.shape[-1], device=embeds.device).index_add_(0, index, embeds)
    per_synonym = F.normalize(per_synonym, dim=-1)
    class_index = torch.tensor([key[0] for key in synonym_keys], device=embeds.device)
    per_class = torch.zeros(num_classes, embeds.shape[-1], device=embeds.device).index_add_(0, class_index, per_synonym)
    return F.normalize(per_class, dim=-1)


class MROVSegOpenVocabClassifier(nn.Module):
    """Cosine similarity x CLIP's logit scale against the class text embeddings, plus a learned no-object class."""

    def __init__(self, projection_dim: int):
        super().__init__()
        self.no_object_embedding = nn.Parameter(torch.zeros(projection_dim))

    def forward(self, query_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """query_embeds (B, N, P) unit norm, text_embeds (C, P) or (B, C, P) -> (B, N, C + 1) logits."""
        if text_embeds.dim() == 2:
            text_embeds = text_embeds[None].expand(query_embeds.shape[0], -1, -1)
        no_object = F.normalize(self.no_object_embedding, dim=-1)
        classes = torch.cat([F.normalize(text_embeds, dim=-1), no_object.expand(text_embeds.shape[0], 1, -1)], dim=1)
        return logit_scale.exp().clamp(max=100) * torch.einsum("bnp,bcp->bnc", query_embeds, classes.to(query_embeds.dtype))
