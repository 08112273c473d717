"""Sliding-window geometry shared by the image processor (pixels) and the model (CLIP token maps).

The canvas is padded so that windows of side `window` at a regular `stride` cover it exactly: the last window
of each row and column is flush with the edge, no pixel is left out, and slicing is a strided view whose exact
inverse is a fold (sum) divided by the per-pixel window count (overlaps averaged). Because `window` and `stride`
are multiples of the patch size, the same grid divided by the patch size places every slice's tokens on one
high-resolution token grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SliceGrid:
    """`rows` x `cols` windows of side `window`, `stride` apart, covering a `height` x `width` canvas."""

    rows: int
    cols: int
    window: int
    stride: int

    @classmethod
    def covering(cls, height: int, width: int, window: int, overlap: int = 0) -> "SliceGrid":
        """The smallest grid whose canvas holds a `height` x `width` image."""
        if window <= 0 or not 0 <= overlap < window:
            raise ValueError(f"Need window > 0 and 0 <= overlap < window, got window={window}, overlap={overlap}.")
        if height <= 0 or width <= 0:
            raise ValueError(f"Cannot slice an empty image of size {height} x {width}.")
        stride = window - overlap
        rows = 1 + max(0, math.ceil((height - window) / stride))
        cols = 1 + max(0, math.ceil((width - window) / stride))
        return cls(rows, cols, window, stride)

    @property
    def num_slices(self) -> int:
        return self.rows * self.cols

    @property
    def height(self) -> int:
        return self.window + (self.rows - 1) * self.stride

    @property
    def width(self) -> int:
        return self.window + (self.cols - 1) * self.stride

    def scaled(self, factor: int) -> "SliceGrid":
        """The same grid in units of `factor` pixels (e.g. the CLIP patch size, giving the token grid)."""
        if self.window % factor or self.stride % factor:
            raise ValueError(f"Window {self.window} and stride {self.stride} must be multiples of {factor}.")
        return SliceGrid(self.rows, self.cols, self.window // factor, self.stride // factor)

    def offsets(self) -> list[tuple[int, int]]:
        """(top, left) of every window, row-major: the order of `slice_windows`."""
        return [(r * self.stride, c * self.stride) for r in range(self.rows) for c in range(self.cols)]


def slice_windows(canvas, grid: SliceGrid):
    """Cut `canvas` (..., ch, H, W) of ch channels, numpy or torch, with H x W == the grid's canvas, into (..., K, ch, S, S)."""
    if tuple(canvas.shape[-2:]) != (grid.height, grid.width):
        raise ValueError(
            f"Canvas of size {tuple(canvas.shape[-2:])} does not match the slice grid ({grid.height}, {grid.width})."
        )
    window, stride = grid.window, grid.stride
    if isinstance(canvas, torch.Tensor):
        windows = canvas.unfold(-2, window, stride).unfold(-2, window, stride)  # (..., C, rows, cols, S, S)
    else:
        view = np.lib.stride_tricks.sliding_window_view(canvas, (window, window), axis=(-2, -1))
        windows = view[..., ::stride, ::stride, :, :]
    lead = windows.shape[:-5]
    channels = windows.shape[-5]
    order = (*range(len(lead)), len(lead) + 1, len(lead) + 2, len(lead), len(lead) + 3, len(lead) + 4)
    windows = windows.permute(*order) if isinstance(windows, torch.Tensor) else windows.transpose(order)
    return windows.reshape(*lead, grid.num_slices, channels, window, window)


def stitch_windows(windows: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """Exact inverse of `slice_windows` for torch (B, K, ch, S, S) -> (B, ch, H, W), overlapping values averaged."""
    batch, num, channels, window, _ = windows.shape
    if num != grid.num_slices or window != grid.window:
        raise ValueError(
            f"Got {num} windows of side {window}, the grid expects {grid.num_slices} of side {grid.window}."
        )
    columns = windows.permute(0, 2, 3, 4, 1).reshape(batch, channels * window * window, num)
    size = (grid.height, grid.width)
    summed = F.fold(columns, size, kernel_size=window, stride=grid.stride)
    if grid.stride == grid.window:  # no overlap: every position is covered once
        return summed
    ones = torch.ones(1, window * window, num, dtype=windows.dtype, device=windows.device)
    counts = F.fold(ones, size, kernel_size=window, stride=grid.stride)
    return summed / counts


__all__ = ["SliceGrid", "slice_windows", "stitch_windows"]
