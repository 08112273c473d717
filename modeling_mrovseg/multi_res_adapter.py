"""Multi-Res Adapter: fuse the stitched high-resolution map and the global map of one tapped CLIP layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_mrovseg import MROVSegConfig
from .layers import MROVSegLayerNorm2d


class MROVSegMultiResAdapter(nn.Module):
    """
    One adapter per tapped layer. Slices are encoded independently, so their stitched token map has seams; a
    residual depthwise-separable conv lets neighbouring slices exchange context and repair them. The global map
    (whole image, coarse) is upsampled bilinearly to the same grid, a per-location scale attention (1x1 conv over
    both maps, softmax over the two scales) decides which resolution to trust where, and the weighted sum is
    projected to the decoder width D.

    Without a high-resolution map (the single-resolution ablation) the global map is projected on its own grid.
    """

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        channels = config.vision_config.hidden_size
        kernel = config.adapter_kernel_size
        self.use_scale_attention = config.use_scale_attention
        self.seam_depthwise = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.seam_pointwise = nn.Conv2d(channels, channels, 1)
        self.scale_attention = nn.Conv2d(2 * channels, 2, 1) if config.use_scale_attention else None
        self.projection = nn.Sequential(nn.Conv2d(channels, config.hidden_dim, 1), MROVSegLayerNorm2d(config.hidden_dim))

    def forward(self, global_map: torch.Tensor, high_res_map: torch.Tensor | None = None) -> torch.Tensor:
        """global_map (B, C, g, g), high_res_map (B, C, h, w) or None -> fused (B, D, h, w)."""
        if high_res_map is None:
            return self.projection(global_map)
        high_res_map = high_res_map + self.seam_pointwise(self.seam_depthwise(high_res_map))
        global_up = F.interpolate(global_map, size=high_res_map.shape[-2:], mode="bilinear", align_corners=False)
        if self.scale_attention is None:
            fused = 0.5 * (high_res_map + global_up)
        else:
            weights = self.scale_attention(torch.cat([high_res_map, global_up], dim=1)).softmax(dim=1)
            fused = weights[:, :1] * high_res_map + weights[:, 1:] * global_up
        return self.projection(fused)
