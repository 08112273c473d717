"""Multi-grained Masked Attention: [CLS]-seeded queries read both resolutions through CLIP's own last layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from collections.abc import Callable

from .configuration_mrovseg import MROVSegConfig


class MROVSegMultiGrainedMaskedAttention(nn.Module):
    """
    The [CLS] token at `query_layer` is duplicated into N queries (a learned projection plus learned per-query
    embeddings). Each remaining CLIP layer then updates only the queries, as cross-attention with that layer's
    frozen q/k/v/out projections, layer norms and MLP: every query attends to itself, to the global-view tokens
    under the *global* attention bias and to the stitched high-resolution tokens under the *local* one. The cost
    is N x tokens per layer (linear in pixels), never a joint self-attention over all high-resolution tokens.
    """

    def __init__(self, config: MROVSegConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.num_queries = config.num_queries
        self.use_local_mask = config.use_local_mask
        self.query_projection = nn.Linear(width, width)
        self.query_embeddings = nn.Parameter(torch.zeros(config.num_queries, width))

    def seed_queries(self, cls_token: torch.Tensor) -> torch.Tensor:
        """(B, C) [CLS] -> (B, N, C) query tokens."""
        return self.query_projection(cls_token)[:, None, :] + self.query_embeddings[None]

    def forward(
        self,
        cls_token: torch.Tensor,
        clip_layers: list[nn.Module],
        global_tokens: list[torch.Tensor],
        high_res_tokens: list[torch.Tensor | None],
        attention_bias: Callable[[int], torch.Tensor],
        global_grid: tuple[int, int],
        high_res_grid: tuple[int, int] | None,
    ) -> torch.Tensor:
        """
        cls_token (B, C); per remaining layer l: `global_tokens[l]` (B, Tg, C) and `high_res_tokens[l]` (B, Th, C) or
        None, the inputs CLIP layer l saw in the backbone pass; attention_bias(l) gives (B, H, N, h, w). Returns
        (B, N, C).
        """
        queries = self.seed_queries(cls_token)
        batch, num_queries, _ = queries.shape
        self_bias = torch.full((num_queries, num_queries), float("-inf"), device=queries.device, dtype=queries.dtype)
        self_bias.fill_diagonal_(0.0)
        for index, layer in enumerate(clip_layers):
            bias = attention_bias(index).to(queries.dtype)  # (B, H, N, h, w)
            heads = bias.shape[1]
            flat = bias.flatten(0, 2)
            global_bias = F.adaptive_max_pool2d(flat, global_grid).reshape(batch, heads, num_queries, -1)
            parts_bias = [self_bias.expand(batch, heads, -1, -1), global_bias]
            context = [global_tokens[index]]
            if high_res_tokens[index] is not None:
                if self.use_local_mask:
                    local = flat if tuple(flat.shape[-2:]) == tuple(high_res_grid) else F.adaptive_max_pool2d(flat, high_res_grid)
                    parts_bias.append(local.reshape(batch, heads, num_queries, -1))
                else:
                    parts_bias.append(bias.new_zeros(batch, heads, num_queries, high_res_tokens[index].shape[1]))
                context.append(high_res_tokens[index])
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
