"""Small building blocks shared by the MROVSeg modules."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MROVSegLayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, at every location independently."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MROVSegMLP(nn.Module):
    """A plain multi-layer perceptron with GELU between layers."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def sine_position_embedding(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(H*W, dim) 2-D sine/cosine position codes, normalised to the map so any grid size works."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    y = ys[:, None, None] * omega
    x = xs[None, :, None] * omega
    y = y.expand(height, width, quarter)
    x = x.expand(height, width, quarter)
    embed = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1).reshape(height * width, 4 * quarter)
    if embed.shape[-1] < dim:
        embed = F.pad(embed, (0, dim - embed.shape[-1]))
    return embed.to(dtype=dtype or torch.float32)


class _QuickGELUFunction(torch.autograd.Function):
    """x * sigmoid(1.702 x), keeping only x for the backward; it recomputes the sigmoid with the ops autograd would
    have run, so values and gradients are bit-identical to the plain expression's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate = torch.sigmoid(1.702 * x)
        return grad * gate + torch.ops.aten.sigmoid_backward(grad * x, gate) * 1.702


class MROVSegQuickGELU(nn.Module):
    """CLIP's QuickGELU for layers that train through frozen CLIP (its position embeddings): autograd would keep
    both the input and the sigmoid of every MLP token (3072 wide in ViT-B/16) for the backward, a quarter of what
    CLIP's layers keep; this keeps the input only. Weightless: swapping it in leaves checkpoints unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x * torch.sigmoid(1.702 * x)
        return _QuickGELUFunction.apply(x)
