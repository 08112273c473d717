"""Overlay pictures of label maps with a legible legend, shared by the CLI, the demo and users."""

from __future__ import annotations

import colorsys
import functools
import shutil
import subprocess
import unicodedata
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .configuration_mrovseg import IGNORE_INDEX, unlabelled_value
from .image_processing_mrovseg import to_rgb_uint8


def palette(num_classes: int) -> np.ndarray:
    """(C, 3) uint8 colours, well separated in hue (golden-ratio steps) with alternating brightness."""
    colors = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        saturation = 0.85 if i % 2 == 0 else 0.65
        value = 0.95 if (i // 2) % 2 == 0 else 0.75
        colors.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.array(colors, dtype=np.uint8).reshape(-1, 3)


def colorize(segmentation: np.ndarray, num_classes: int) -> Image.Image:
    """A palette ("P" mode) PNG-ready image of class ids; unlabelled pixels (< 0 or >= C) are black. Past 255 classes
    a palette has no room (it failed, and uint8 ids wrapped): a 16-bit grey image of class ids, 65535 unlabelled, as
    the wide label maps of the datasets (ADE20K-847) are stored."""
    seg = np.asarray(segmentation)
    valid = (seg >= 0) & (seg < num_classes)
    unlabelled = unlabelled_value(num_classes)
    if unlabelled > IGNORE_INDEX:
        return Image.fromarray(np.where(valid, seg, unlabelled).astype(np.uint16))
    ids = np.where(valid, seg, num_classes).astype(np.uint8)
    image = Image.fromarray(ids, mode="P")
    flat = np.concatenate([palette(num_classes), np.zeros((1, 3), np.uint8)]).flatten().tolist()
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


# fonts tried by file name where fontconfig is absent (Windows, macOS) or offers none that draws the legend; PIL finds
# them in the system's font folders
FALLBACK_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "arial.ttf", "Arial Unicode.ttf", "segoeui.ttf",
                  "msyh.ttc", "YuGothR.ttc", "malgun.ttf", "NotoSansCJK-Regular.ttc", "PingFang.ttc",
                  "Hiragino Sans GB.ttc", "AppleSDGothicNeo.ttc")
_reported_missing: set[str] = set()
LEGEND_CHARACTERS = frozenset("0123456789.% + more classes unlabelled")  # the legend's own, beside class names


def missing_glyphs(font: ImageFont.FreeTypeFont, text: str) -> set[str]:
    """Characters of `text` that `font` draws as its .notdef box (compared by bitmap: PIL exposes no glyph table).
    PIL's bundled default font has ASCII only: "café", "Straße" or "кошка" came out as boxes."""
    def ink(character: str) -> tuple:
        mask = font.getmask(character)
        return mask.size, np.asarray(mask).tobytes()

    notdef = ink("\U0010fffd")  # a private-use code point no font draws
    return {c for c in set(text) if unicodedata.category(c)[0] not in "ZCM" and ink(c) == notdef}


@functools.cache
def _font_for(characters: frozenset[str]) -> tuple[str | None, frozenset[str]]:
    """(font file, characters it lacks) for text of these characters: PIL's default (None) when it draws them all,
    else the first of fontconfig's sans-serif fonts for them, then of `FALLBACK_FONTS`, that draws them all, else the
    one that lacks fewest."""
    text = "".join(sorted(characters))
    best = (None, frozenset(missing_glyphs(ImageFont.load_default(size=20), text)))
    if not best[1]:
        return best
    candidates = []
    if shutil.which("fc-match"):
        pattern = "sans-serif:charset=" + " ".join(f"{ord(c):x}" for c in sorted(characters))
        try:
            found = subprocess.run(["fc-match", "-s", "-f", "%{file}\n", pattern], capture_output=True, text=True,
                                   timeout=20).stdout
            candidates += found.splitlines()[:30]
        except (OSError, subprocess.SubprocessError):
            pass
    for name in dict.fromkeys([*candidates, *FALLBACK_FONTS]):
        try:
            lacking = frozenset(missing_glyphs(ImageFont.truetype(name, 20), text))
        except OSError:  # not installed, or not a font PIL reads
            continue
        if len(lacking) < len(best[1]):
            best = (name, lacking)
        if not lacking:
            break
    return best


def legend_font(texts: Sequence[str], size: int) -> ImageFont.FreeTypeFont:
    """A font that draws every legend text (class names of any script); where no installed font does, the best one,
    with a warning naming the characters shown as boxes (once per process)."""
    name, lacking = _font_for(frozenset("".join(texts)) | LEGEND_CHARACTERS)  # one search for a folder's images
    new = [c for c in dict.fromkeys("".join(texts)) if c in lacking and c not in _reported_missing]
    if new:
        _reported_missing.update(new)
        warnings.warn(f"no installed font draws {''.join(new)!r}: the legend shows boxes for them; install a font that "
                      "has them (on Debian/Ubuntu fonts-noto-cjk for Chinese, Japanese and Korean)", stacklevel=3)
    return ImageFont.load_default(size=size) if name is None else ImageFont.truetype(name, size)


# rows a legend may take below a small image; past them (and past the image's height) the smallest classes share
# one "+ N more classes" row: 150 classes on a 120 px photo made a 3,300 px tall picture of legend
LEGEND_MIN_ROWS = 12


def draw_segmentation(image, segmentation, labels: Sequence[str], alpha: float = 0.5,
                      show_absent: bool = False) -> Image.Image:
    """
    Blend class colours over `image` and add a legend panel (colour swatch, class name, pixel share) to the right.

    `segmentation` is an (H, W) array or tensor of class ids matching the image size; by default the legend lists
    only the classes present, largest first, as many as fit beside the image (at least `LEGEND_MIN_ROWS` rows), the
    rest summed in one row. The image is read as the image processor reads it (`to_rgb_uint8`: a photo's EXIF
    orientation, 16-bit, transparency, float arrays), so the colours land on the pixels the model labelled.
    """
    seg = segmentation.cpu().numpy() if hasattr(segmentation, "cpu") else np.asarray(segmentation)
    base = Image.fromarray(to_rgb_uint8(image))
    if seg.shape != (base.height, base.width):
        raise ValueError(f"segmentation has shape {seg.shape} but the image is {base.height} x {base.width}.")
    colors = palette(len(labels))
    pixels = np.array(base)
    counts = np.zeros(len(labels), dtype=np.int64)
    step = max(1, 2**20 // base.width)  # rows at a time: a 120-megapixel aerial photo took 4 GB more as one block
    for top in range(0, base.height, step):
        part, rows = seg[top : top + step], pixels[top : top + step]
        valid = (part >= 0) & (part < len(labels))
        ids = part[valid]
        mixed = (1 - alpha) * rows[valid].astype(np.float32) + alpha * colors[ids]
        rows[valid] = mixed.astype(np.float32).round().astype(np.uint8)
        counts += np.bincount(ids, minlength=len(labels))
    blended = Image.fromarray(pixels)

    shown = [i for i in np.argsort(-counts, kind="stable") if show_absent or counts[i] > 0]
    unlabelled = int(seg.size - counts.sum())
    font_size = max(14, min(48, base.height // 30))
    row = int(font_size * 1.6)
    draw_probe = ImageDraw.Draw(blended)
    # shares of all pixels, as in the CLI's JSON; pixels left unlabelled (score threshold) get their own row
    rows = max(base.height // row - 1, LEGEND_MIN_ROWS) - bool(unlabelled)
    shown, rest = (shown[: rows - 1], shown[rows - 1 :]) if len(shown) > rows else (shown, [])
    texts = [f"{labels[i]}  {100 * counts[i] / seg.size:.1f}%" for i in shown]
    if rest:
        texts.append(f"+ {len(rest)} more classes  {100 * counts[rest].sum() / seg.size:.1f}%")
    if unlabelled:
        texts.append(f"unlabelled  {100 * unlabelled / seg.size:.1f}%")
    font = legend_font(texts, font_size)
    text_width = max((draw_probe.textlength(t, font=font) for t in texts), default=0)
    panel_width = int(text_width + row * 2)
    canvas = Image.new("RGB", (base.width + panel_width, max(base.height, row * (len(texts) + 1))), "white")
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    swatches = [tuple(int(c) for c in colors[i]) for i in shown] + [None] * (bool(rest) + bool(unlabelled))
    for k, (swatch, text) in enumerate(zip(swatches, texts)):
        top = row // 2 + k * row
        left = base.width + row // 2
        draw.rectangle([left, top, left + font_size, top + font_size], fill=swatch or "white", outline="black")
        draw.text((left + int(font_size * 1.5), top), text, fill="black", font=font)
    return canvas


__all__ = ["palette", "colorize", "draw_segmentation"]
