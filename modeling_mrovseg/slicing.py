"""Sliding-window geometry shared by the image processor (pixels) and the model (CLIP token maps).

The canvas is padded so that windows of side `window` at a regular `stride` cover it exactly: the last window
of each row and column is flush with the edge, no pixel is left out, and slicing is a strided view whose exact
inverse puts the windows back in place and divides by the per-pixel window count (overlaps averaged). Because
`window` and `stride` are multiples of the patch size, the same grid divided by the patch size places every slice's
tokens on one high-resolution token grid.
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
    """Exact inverse of `slice_windows` for torch (B, K, ch, S, S) -> (B, ch, H, W), overlapping values averaged.

    Windows `p = ceil(S / stride)` apart along an axis never overlap, so the windows fall into p x p groups that each
    tile the canvas by reshaping alone; the groups' canvases are summed and divided by the window count. Without
    overlap that is one permute. (Not `F.fold`: torch.compile's CPU code for it writes out of bounds on this layout.)
    """
    batch, num, channels, window, _ = windows.shape
    if num != grid.num_slices or window != grid.window:
        raise ValueError(
            f"Got {num} windows of side {window}, the grid expects {grid.num_slices} of side {grid.window}."
        )
    stride, height, width = grid.stride, grid.height, grid.width
    tiles = windows.reshape(batch, grid.rows, grid.cols, channels, window, window)
    phases = -(-window // stride)
    if phases == 1:  # no overlap: the windows tile the canvas
        return tiles.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)
    cell = phases * stride
    dtype = tiles.dtype if tiles.is_floating_point() else torch.float32  # averaged integers (pixels) are not
    summed = tiles.new_zeros(batch, channels, height, width, dtype=dtype)
    for row_phase in range(min(phases, grid.rows)):
        for col_phase in range(min(phases, grid.cols)):
            group = F.pad(tiles[:, row_phase::phases, col_phase::phases], (0, cell - window, 0, cell - window))
            rows, cols = group.shape[1:3]
            canvas = group.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, rows * cell, cols * cell)
            top, left = row_phase * stride, col_phase * stride
            canvas = canvas[..., : height - top, : width - left]  # the last cell's padding may pass the edge
            summed[..., top : top + canvas.shape[-2], left : left + canvas.shape[-1]] += canvas
    return summed / (_coverage(grid.rows, window, stride, height, windows.device)[:, None]
                     * _coverage(grid.cols, window, stride, width, windows.device))


def _coverage(count: int, window: int, stride: int, length: int, device: torch.device) -> torch.Tensor:
    """How many of `count` windows (`window` long, `stride` apart) cover each of `length` positions."""
    position = torch.arange(length, device=device)
    last = (position // stride).clamp(max=count - 1)
    first = torch.div(position - window + stride, stride, rounding_mode="floor").clamp(min=0)
    return last - first + 1


__all__ = ["SliceGrid", "slice_windows", "stitch_windows"]
