"""Deformable DETR encoder blocks over the cached multi-scale memory E, in pure PyTorch
(the sampling is :func:`mfcache.deformable_attention.ms_deform_attn`, shared with the
native detectors).

Padding of batched maps is not masked (the detector's valid ratios are not cached per
level here): padded tokens are zeros, and each image's content is at the top left.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mfcache.deformable_attention import ms_deform_attn

from mfcache.heads.position import sine_position


class MultiScaleDeformableAttention(nn.Module):
    """``query [B, Q, C]``, ``reference [B, Q, 2]`` (x, y) in [0, 1] of the image,
    ``tokens [B, sum(h*w), C]`` all levels flattened, ``shapes`` their (h, w) -> ``[B, Q, C]``. Each of ``heads`` heads samples
    ``points`` points per level around the reference (offsets in level pixels, predicted
    from the query) and averages them with softmax weights over levels x points."""

    def __init__(self, *, dim: int, num_levels: int, heads: int = 4, points: int = 4):
        super().__init__()
        self.heads, self.num_levels, self.points = heads, num_levels, points
        self.offsets = nn.Linear(dim, heads * num_levels * points * 2)
        self.weights = nn.Linear(dim, heads * num_levels * points)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        # Deformable DETR's init: head h starts on a ray at angle 2*pi*h/heads, point p at distance p + 1
        nn.init.zeros_(self.offsets.weight)
        angle = torch.arange(heads) * (2 * math.pi / heads)
        ray = torch.stack([angle.cos(), angle.sin()], -1)
        ray = ray / ray.abs().max(-1, keepdim=True).values
        bias = ray[:, None, None, :] * torch.arange(1, points + 1)[None, None, :, None]
        with torch.no_grad():
            self.offsets.bias.copy_(bias.expand(heads, num_levels, points, 2).flatten())
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def forward(self, query: Tensor, reference: Tensor, tokens: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        b, q, c = query.shape
        h, p = self.heads, self.points
        value = self.value(tokens).view(b, tokens.shape[1], h, c // h)
        spatial_shapes = torch.tensor(shapes, device=query.device)
        scale = spatial_shapes.flip(-1).to(query.dtype)  # (w, h) per level: offsets are in level pixels
        offsets = self.offsets(query).view(b, q, h, self.num_levels, p, 2)
        locations = reference[:, :, None, None, None, :] + offsets / scale[None, None, None, :, None, :]
        weights = self.weights(query).view(b, q, h, -1).softmax(-1).view(b, q, h, self.num_levels, p)
        return self.out(ms_deform_attn(value, spatial_shapes, locations, weights))


class DeformableEncoderBlock(nn.Module):
    """Post-norm Deformable DETR encoder layer: every token of every level attends to all levels."""

    def __init__(self, *, dim: int, num_levels: int, hidden: int):
        super().__init__()
        self.attn = MultiScaleDeformableAttention(dim=dim, num_levels=num_levels)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, tokens: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """tokens, pos [B, T, C] (all levels flattened, T = sum h*w); reference [B, T, 2]."""
        tokens = self.norm1(tokens + self.attn(tokens + pos, reference, tokens, shapes))
        return self.norm2(tokens + self.ffn(tokens))


class DeformableEncoder(nn.Module):
    """``levels``: list of ``[B, D, H_l, W_l]`` (all levels of E) -> the same list, refined by
    ``depth`` deformable encoder blocks (sine position + a learned level embedding)."""

    def __init__(self, *, dim: int, num_levels: int, depth: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.randn(num_levels, dim) * 0.02)
        self.blocks = nn.ModuleList(DeformableEncoderBlock(dim=dim, num_levels=num_levels, hidden=2 * dim)
                                    for _ in range(depth))

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        shapes = [tuple(x.shape[-2:]) for x in levels]
        dim = levels[0].shape[1]
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)
        pos = torch.cat([sine_position(h, w, dim, device=tokens.device, dtype=tokens.dtype) + self.level_embed[l]
                         for l, (h, w) in enumerate(shapes)], 0)
        reference = torch.cat([_centres(h, w, tokens) for h, w in shapes], 0)
        batch = tokens.shape[0]
        pos, reference = pos.expand(batch, -1, -1), reference.expand(batch, -1, -1)
        for block in self.blocks:
            tokens = block(tokens, pos, reference, shapes)
        return [t.transpose(1, 2).unflatten(2, hw) for t, hw in zip(tokens.split([h * w for h, w in shapes], 1), shapes)]


def _centres(height: int, width: int, like: Tensor) -> Tensor:
    """Pixel centres of an ``height x width`` map as ``[H*W, 2]`` (x, y) in [0, 1]."""
    y = (torch.arange(height, device=like.device, dtype=like.dtype) + 0.5) / height
    x = (torch.arange(width, device=like.device, dtype=like.dtype) + 0.5) / width
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2)
