"""Multi-grained Masked Attention: [CLS]-seeded queries read both resolutions through CLIP's own last layers.

Shapes: B images, N queries, W CLIP width, H attention heads, (g, g) the global token grid, (h, w) the stitched
high-resolution token grid, (h', w') the deepest fused map the attention biases are predicted on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_mrovseg import MROVSegConfig
from .layers import MROVSegMLP


class MROVSegAttentionBiasDecoder(nn.Module):
    """
    SAN-style attention biases for the masked-attention CLIP layers: per (remaining layer, head), the dot product
    of a query embedding with a pixel embedding of the deepest fused map, times a learned scale plus a learned
    shift. Each layer's (B, H, N, h', w') bias is max-pooled to the global and high-resolution token grids.
    """

    def __init__(self, config: MROVSegConfig, num_layers: int, num_heads: int, embed_dim: int = 32):
        super().__init__()
        self.num_layers, self.num_heads, self.embed_dim = num_layers, num_heads, embed_dim
        groups = num_layers * num_heads
        self.query_embed = MROVSegMLP(config.hidden_dim, config.hidden_dim, groups * embed_dim, 2)
        self.pixel_embed = nn.Conv2d(config.hidden_dim, groups * embed_dim, 1)
        self.scale = nn.Parameter(torch.ones(groups))
        self.shift = nn.Parameter(torch.zeros(groups))

    def embed_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, N, D) decoder queries -> (B, N, layers, H, e) embeddings, each group's pre-multiplied by its learned
        scale / sqrt(e): computed once per forward for all layers."""
        batch, num_queries, _ = queries.shape
        embeds = self.query_embed(queries).view(batch, num_queries, self.num_layers, self.num_heads, self.embed_dim)
        scale = self.scale.view(self.num_layers, self.num_heads, 1) * self.embed_dim**-0.5
        return embeds * scale.to(embeds.dtype)  # kept in the embeddings' dtype: the pixel embeddings share it

    def forward(self, query_embeds: torch.Tensor, memory_map: torch.Tensor, layer: int) -> torch.Tensor:
        """Bias for one remaining CLIP layer, (B, H, N, h', w'), from `embed_queries`' output: computed per layer so
        only one is ever in memory."""
        batch, num_queries = query_embeds.shape[:2]
        height, width = memory_map.shape[-2:]
        layers, heads, dim = self.num_layers, self.num_heads, self.embed_dim
        weight = self.pixel_embed.weight.view(layers, heads * dim, *self.pixel_embed.weight.shape[1:])[layer]
        p = F.conv2d(memory_map, weight, self.pixel_embed.bias.view(layers, heads * dim)[layer])
        bias = torch.einsum("bqgd,bgdp->bgqp", query_embeds[:, :, layer], p.view(batch, heads, dim, height * width))
        bias = bias + self.shift.view(layers, heads, 1, 1)[layer]
        return bias.view(batch, heads, num_queries, height, width)


class MROVSegMultiGrainedMaskedAttention(nn.Module):
    """
    The [CLS] token at `query_layer` is duplicated into N queries (a learned projection plus learned per-query
    embeddings). Each remaining CLIP layer then updates only the queries, as cross-attention with that layer's
    frozen q/k/v/out projections, layer norms and MLP: every query attends to itself, to the global-view tokens
    under the *global* attention bias and to the stitched high-resolution tokens under the *local* one. Both biases
    come from this module's `bias_decoder`, pooled (max) to each token grid. The cost is N x tokens per layer (linear
    in pixels), never a joint self-attention over all high-resolution tokens.
    """

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        vision = config.vision_config
        width = vision.hidden_size
        self.num_queries = config.num_queries
        self.use_local_mask = config.use_local_mask
        self.query_projection = nn.Linear(width, width)
        self.query_embeddings = nn.Parameter(torch.zeros(config.num_queries, width))
        num_remaining = vision.num_hidden_layers - config.query_layer
        self.bias_decoder = MROVSegAttentionBiasDecoder(config, num_remaining, vision.num_attention_heads)

    def seed_queries(self, cls_token: torch.Tensor) -> torch.Tensor:
        """(B, W) [CLS] -> (B, N, W) query tokens."""
        return self.query_projection(cls_token)[:, None, :] + self.query_embeddings[None]

    def forward(
        self,
        cls_token: torch.Tensor,
        clip_layers: list[nn.Module],
        global_tokens: list[torch.Tensor],
        high_res_maps: list[torch.Tensor] | None,
        decoder_queries: torch.Tensor,
        memory_map: torch.Tensor,
    ) -> torch.Tensor:
        """
        cls_token (B, W); per remaining CLIP layer l: `global_tokens[l]` (B, g*g, W) and `high_res_maps[l]`
        (B, W, h, w) (None: single resolution), the inputs layer l saw in the backbone pass. `decoder_queries`
        (B, N, D) and `memory_map` (B, D, h', w') predict the attention biases. Returns the queries (B, N, W).
        """
        queries = self.seed_queries(cls_token)
        batch, num_queries, _ = queries.shape
        side = int(round(global_tokens[0].shape[1] ** 0.5))
        global_grid = (side, side)
        high_res_grid = None if high_res_maps is None else tuple(high_res_maps[0].shape[-2:])
        eye = torch.eye(num_queries, device=queries.device, dtype=torch.bool)  # each query sees itself, no other
        self_bias = torch.zeros(num_queries, num_queries, device=queries.device, dtype=queries.dtype).masked_fill(
            ~eye, float("-inf"))
        bias_queries = self.bias_decoder.embed_queries(decoder_queries)
        for index, layer in enumerate(clip_layers):
            bias = self.bias_decoder(bias_queries, memory_map, index)  # (B, H, N, h', w')
            bias = bias if bias.dtype == queries.dtype else bias.to(queries.dtype)
            heads = bias.shape[1]
            flat = bias.flatten(0, 2)
            global_bias = F.adaptive_max_pool2d(flat, global_grid).reshape(batch, heads, num_queries, -1)
            parts_bias = [self_bias.expand(batch, heads, -1, -1), global_bias]
            context = [global_tokens[index]]
            if high_res_maps is not None:
                high_res_tokens = high_res_maps[index].flatten(2).transpose(1, 2)
                if self.use_local_mask:
                    local = flat if tuple(flat.shape[-2:]) == high_res_grid else F.adaptive_max_pool2d(flat, high_res_grid)
                    parts_bias.append(local.reshape(batch, heads, num_queries, -1))
                else:
                    parts_bias.append(bias.new_zeros(batch, heads, num_queries, high_res_tokens.shape[1]))
                context.append(high_res_tokens)
            queries = self._cross_attention_layer(layer, queries, torch.cat(context, 1), torch.cat(parts_bias, -1))
        return queries

    @staticmethod
    def _cross_attention_layer(layer: nn.Module, queries, context, bias) -> torch.Tensor:
        """One CLIP encoder layer applied to the queries only, keys/values = [queries; context]."""
        attn = layer.self_attn
        batch, num_queries, width = queries.shape
        heads = attn.num_heads
        normed_queries = layer.layer_norm1(queries)
        keys_values = torch.cat([normed_queries, layer.layer_norm1(context)], dim=1)

        def split(x):
            return x.view(batch, x.shape[1], heads, width // heads).transpose(1, 2)

        q = split(attn.q_proj(normed_queries))
        k = split(attn.k_proj(keys_values))
        v = split(attn.v_proj(keys_values))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        queries = queries + attn.out_proj(out.transpose(1, 2).reshape(batch, num_queries, width))
        return queries + layer.mlp(layer.layer_norm2(queries))


__all__ = ["MROVSegAttentionBiasDecoder", "MROVSegMultiGrainedMaskedAttention"]
