"""Sine embeddings of the Deformable DETR lineage (no parameters).

Every function interleaves sin/cos pairs per coordinate exactly as the originals
(``stack((x[..., 0::2].sin(), x[..., 1::2].cos()), -1).flatten``), so weights trained
on them see the same features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TWO_PI = 2 * math.pi


def _dim_t(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave(x: Tensor) -> Tensor:
    """[..., F] phases -> [..., F] features: sin of even, cos of odd, interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def image_position_embedding(
    pad_mask: Tensor, num_feats: int, *, temperature: float = 10000.0, offset: float = 0.0
) -> Tensor:
    """DETR's normalised 2-d sine embedding of a feature map.

    pad_mask [B, H, W] bool, True = padding -> [B, 2*num_feats, H, W] (y features, then x).
    Positions are cumulative counts of real pixels minus ``offset``, divided by the real
    extent, times 2*pi. Deformable DETR / H-DETR use ``offset=0.5`` and temperature 10000;
    DINO (``PositionEmbeddingSineHW``) uses ``offset=0`` and temperature 20.
    """
    not_mask = ~pad_mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y = (y - offset) / (y[:, -1:, :] + eps) * TWO_PI
    x = (x - offset) / (x[:, :, -1:] + eps) * TWO_PI
    dim_t = _dim_t(num_feats, temperature, pad_mask.device)
    pos_x = _interleave(x[..., None] / dim_t)
    pos_y = _interleave(y[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def proposal_position_embedding(proposals_unsigmoid: Tensor, num_feats: int) -> Tensor:
    """Deformable DETR's ``get_proposal_pos_embed``: [B, Q, 4] unsigmoided (cx, cy, w, h)
    -> [B, Q, 4*num_feats], coordinates in the order cx, cy, w, h."""
    dim_t = _dim_t(num_feats, 10000.0, proposals_unsigmoid.device)
    pos = proposals_unsigmoid.sigmoid() * TWO_PI
    return _interleave(pos[..., None] / dim_t).flatten(2)


def box_sine_embedding(boxes: Tensor, num_feats: int) -> Tensor:
    """DINO's ``gen_sineembed_for_position``: [B, Q, 2|4] (x, y[, w, h]) in [0, 1]
    -> [B, Q, 2|4 * num_feats], coordinates in the order y, x, w, h."""
    dim_t = _dim_t(num_feats, 10000.0, boxes.device)
    feats = _interleave(boxes[..., None] * TWO_PI / dim_t)  # [B, Q, C, F]
    order = [1, 0] if boxes.shape[-1] == 2 else [1, 0, 2, 3]
    return feats[..., order, :].flatten(2)
