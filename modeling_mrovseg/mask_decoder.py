"""Hierarchical mask decoding: the pixel decoder, the light query decoder and the mask head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_mrovseg import MROVSegConfig
from .layers import MROVSegLayerNorm2d, MROVSegMLP, sine_position_embedding


class MROVSegPixelDecoder(nn.Module):
    """
    Hierarchical upsampling, one 2x stage per tapped layer, deepest first: the running map is upsampled 2x and
    concatenated with the next-shallower adapted feature (laterally projected to the stage width, then upsampled
    to the same size), then a 3x3 conv block. Widths shrink as resolution grows (`pixel_decoder_channels`) so the
    decoder stays a small fraction of the CLIP cost even at 8x the token grid.
    """

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        widths = config.pixel_decoder_channels
        # the last stage has no shallower tapped layer left, so no lateral (lists of one module class each:
        # accelerate's regional compilation compiles a mixed list as one module, which cannot be iterated)
        self.laterals = nn.ModuleList(nn.Conv2d(config.hidden_dim, width, 1) for width in widths[:-1])
        self.stages = nn.ModuleList()
        in_width = config.hidden_dim
        for k, width in enumerate(widths):
            has_skip = k < len(self.laterals)
            self.stages.append(
                nn.Sequential(
                    nn.Conv2d(in_width + (width if has_skip else 0), width, 3, padding=1, bias=False),
                    MROVSegLayerNorm2d(width),
                    nn.GELU(),
                )
            )
            in_width = width

    def forward(self, fused: list[torch.Tensor]) -> torch.Tensor:
        """fused: adapted maps of the tapped layers, shallow to deep, (B, D, h, w) -> (B, c, h*2^T, w*2^T)."""
        x = fused[-1]
        skips = fused[:-1][::-1]  # next-shallower first
        for k, stage in enumerate(self.stages):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            if k < len(self.laterals):
                skip = F.interpolate(self.laterals[k](skips[k]), size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)
                x = torch.cat([x, skip], dim=1)
            x = stage(x)
        return x


def attend(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """
    `attn(query, key, value)` of a batch-first `nn.MultiheadAttention` without masks or dropout, computed from its
    own parameters in about half the ops of `F.multi_head_attention_forward` (fewer kernel launches on a GPU). When
    `key is query` (self-attention) their projections are one matmul.
    """
    batch, length, dim = query.shape
    heads = attn.num_heads
    if key is query:
        (w_qk, w_v), (b_qk, b_v) = attn.in_proj_weight.split([2 * dim, dim]), attn.in_proj_bias.split([2 * dim, dim])
        qk = F.linear(query, w_qk, b_qk).view(batch, length, 2, heads, dim // heads)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        (w_q, w_k, w_v), (b_q, b_k, b_v) = attn.in_proj_weight.split(dim), attn.in_proj_bias.split(dim)
        q = F.linear(query, w_q, b_q).view(batch, length, heads, -1).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(batch, key.shape[1], heads, -1).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(batch, value.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class MROVSegQueryDecoderLayer(nn.Module):
    """Cross-attention to the fused features, self-attention among queries, feed-forward (pre-norm)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def forward(self, queries, query_pos, memory, memory_with_pos):
        """memory_with_pos: memory + its position codes (the same for every layer, so added once by the caller)."""
        queries = queries + attend(self.cross_attn, self.cross_norm(queries) + query_pos, memory_with_pos, memory)
        q = self.self_norm(queries)
        q_pos = q + query_pos
        queries = queries + attend(self.self_attn, q_pos, q_pos, q)
        return queries + self.ffn(self.ffn_norm(queries))


class MROVSegQueryDecoder(nn.Module):
    """Learned queries over the deepest fused map; every layer's output feeds a (possibly auxiliary) mask head."""

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        dim = config.hidden_dim
        self.query_features = nn.Embedding(config.num_queries, dim)
        self.query_position = nn.Embedding(config.num_queries, dim)
        self.layers = nn.ModuleList(
            MROVSegQueryDecoderLayer(dim, config.num_decoder_heads, config.decoder_ffn_dim)
            for _ in range(config.num_decoder_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self._position_cache: tuple[tuple, torch.Tensor] | None = None

    def memory_position(self, height: int, width: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        """The memory's sine position codes, kept for the last grid seen (eager: ~20 small ops saved per forward)."""
        if torch.compiler.is_compiling():  # a compiled graph folds them into a constant anyway
            return sine_position_embedding(height, width, dim, like.device, like.dtype)
        key = (height, width, dim, like.device, like.dtype, torch.is_inference_mode_enabled())
        cached = self._position_cache  # read once: a model shared by threads may replace it meanwhile
        if cached is None or cached[0] != key:
            cached = self._position_cache = (key, sine_position_embedding(height, width, dim, like.device, like.dtype))
        return cached[1]

    def forward(self, memory_map: torch.Tensor) -> list[torch.Tensor]:
        batch, dim, height, width = memory_map.shape
        memory = memory_map.flatten(2).transpose(1, 2)
        memory_with_pos = memory + self.memory_position(height, width, dim, memory)
        queries = self.query_features.weight.expand(batch, -1, -1)
        query_pos = self.query_position.weight
        outputs = []
        for layer in self.layers:
            queries = layer(queries, query_pos, memory, memory_with_pos)
            outputs.append(self.norm(queries))
        return outputs


class MROVSegMaskHead(nn.Module):
    """Mask logits as the inner product of per-query mask embeddings with the final pixel features."""

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        self.mask_embed = MROVSegMLP(config.hidden_dim, config.hidden_dim, config.pixel_decoder_channels[-1], 3)

    def forward(self, queries: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), pixel_features)
