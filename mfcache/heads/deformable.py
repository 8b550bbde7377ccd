"""Deformable DETR encoder blocks over the cached multi-scale memory E, in pure PyTorch
(the attention is :class:`mfcache.ops.deformable_attention.MSDeformAttn`, shared with the
native detectors).

It runs on one image's own valid levels (:class:`mfcache.heads.fusion.FusedMap` crops them),
so positions, reference points and sampling are normalised to that image and no batch
padding is ever attended to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfcache.heads.position import sine_position
from mfcache.ops.deformable_attention import MSDeformAttn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class DeformableEncoderBlock(nn.Module):
    """Post-norm Deformable DETR encoder layer: every token of every level attends to all levels;
    the FFN's ``activation`` is ``relu`` (Deformable DETR's) or ``gelu`` (the paper's)."""

    def __init__(self, *, dim: int, num_levels: int, hidden: int, activation: str = "relu"):
        super().__init__()
        self.attn = MSDeformAttn(d_model=dim, n_levels=num_levels, n_heads=4, n_points=4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, dim))

    def forward(
        self, tokens: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]], rows: slice = slice(None)
    ) -> Tensor:
        """tokens, pos [B, T, C] (all levels flattened, T = sum h*w); reference [B, T, 2] ->
        the refined tokens ``[B, T', C]`` of positions ``rows`` only (all by default): they
        attend to every token, but nothing is computed for the others."""
        spatial_shapes = torch.tensor(shapes, device=tokens.device)
        own, references = tokens[:, rows], reference[:, rows, None, :].expand(-1, -1, len(shapes), -1)  # every level
        own = self.norm1(own + self.attn(own + pos[:, rows], references, tokens, spatial_shapes))
        return self.norm2(own + self.ffn(own))


class DeformableEncoder(nn.Module):
    """``levels``: list of ``[B, D, H_l, W_l]`` (all levels of E) -> the same list, refined by
    ``depth`` deformable encoder blocks (sine position + a learned level embedding).

    ``output_level``: return only that level's refined map ``[B, D, H_l, W_l]``; the last block
    then computes that level's tokens alone (the other levels' outputs would be dropped), the
    same values as the full forward's entry."""

    def __init__(self, *, dim: int, num_levels: int, depth: int, activation: str = "relu"):
        super().__init__()
        self.level_embed = nn.Parameter(torch.randn(num_levels, dim) * 0.02)
        self.blocks = nn.ModuleList(
            DeformableEncoderBlock(dim=dim, num_levels=num_levels, hidden=2 * dim, activation=activation)
            for _ in range(depth)
        )

    def forward(self, levels: list[Tensor], output_level: int | None = None) -> list[Tensor] | Tensor:
        shapes = [tuple(x.shape[-2:]) for x in levels]
        dim = levels[0].shape[1]
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)
        pos = torch.cat(
            [
                sine_position(h, w, dim, device=tokens.device, dtype=tokens.dtype) + self.level_embed[l]
                for l, (h, w) in enumerate(shapes)
            ],
            0,
        )
        reference = torch.cat([_centres(h, w, tokens) for h, w in shapes], 0)
        batch = tokens.shape[0]
        pos, reference = pos.expand(batch, -1, -1), reference.expand(batch, -1, -1)
        sizes = [h * w for h, w in shapes]
        for i, block in enumerate(self.blocks):
            if output_level is not None and i == len(self.blocks) - 1:
                start = sum(sizes[:output_level])
                last = block(tokens, pos, reference, shapes, slice(start, start + sizes[output_level]))
                return last.transpose(1, 2).unflatten(2, shapes[output_level])
            tokens = block(tokens, pos, reference, shapes)
        if output_level is not None:  # depth 0
            return levels[output_level]
        return [t.transpose(1, 2).unflatten(2, hw) for t, hw in zip(tokens.split(sizes, 1), shapes)]


def _centres(height: int, width: int, like: Tensor) -> Tensor:
    """Pixel centres of an ``height x width`` map as ``[H*W, 2]`` (x, y) in [0, 1]."""
    y = (torch.arange(height, device=like.device, dtype=like.dtype) + 0.5) / height
    x = (torch.arange(width, device=like.device, dtype=like.dtype) + 0.5) / width
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2)
