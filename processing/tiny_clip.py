"""Tiny random CLIP checkpoints (model + tokenizer) for offline tests, demos and CPU smoke runs.

Real CLIP weights come from the Hub ("openai/clip-vit-base-patch16"); where the Hub is out of reach, this writes a
folder laid out exactly like one, so `from_clip(folder)` exercises the same loading path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from modeling_mrovseg.configuration_mrovseg import CLIP_PRESETS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_clip_vocab(vocab_size: int = 1000) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary with no merges: 256 byte tokens, their end-of-word forms, fillers, specials."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    fillers = vocab_size - 2 - len(tokens)
    if fillers < 0:
        raise ValueError(f"vocab_size must be at least {len(tokens) + 2}")
    tokens += [f"<|unused{i}|>" for i in range(fillers)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, []


def build_tiny_clip(path: str | os.PathLike, seed: int = 0, **vision_overrides) -> Path:
    """Write a random tiny `CLIPModel` and a matching `CLIPTokenizer` to `path` (a Hub-like snapshot folder)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    preset = CLIP_PRESETS["tiny"]
    vocab, merges = tiny_clip_vocab(preset["text"]["vocab_size"])
    text = {**preset["text"], "max_position_embeddings": 77}
    vision = {**preset["vision"], **vision_overrides}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=preset["projection_dim"])
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(path)
    return path


__all__ = ["build_tiny_clip", "tiny_clip_vocab"]
