"""Tiny configs and inputs shared by the tests."""

from __future__ import annotations

import numpy as np

from modeling_mrovseg import MROVSegConfig, MROVSegImageProcessor

LABELS = ["sky", "road", "car"]
TEMPLATES = ["a photo of a {}.", "There is a {} in the scene."]


def tiny_config(labels=LABELS, **overrides) -> MROVSegConfig:
    kwargs = dict(
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        num_queries=8,
        hidden_dim=32,
        num_decoder_heads=4,
        decoder_ffn_dim=64,
        train_num_points=256,
        slice_batch_size=4,
        prompt_templates=TEMPLATES,
    )
    kwargs.update(overrides)
    return MROVSegConfig.from_preset("tiny", **kwargs)


def tiny_processor(config: MROVSegConfig | None = None, **overrides) -> MROVSegImageProcessor:
    config = config or tiny_config()
    kwargs = dict(slice_size=config.slice_size, slice_overlap=config.slice_overlap,
                  size={"shortest_edge": 96, "longest_edge": 256})
    kwargs.update(overrides)
    return MROVSegImageProcessor(**kwargs)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bomb(side: int = 50000) -> bytes:
    """A valid PNG header declaring a side x side RGB image (7.5 GB at 50000) in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
