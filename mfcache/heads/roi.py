"""RoIAlign as two matrix products: bilinear sampling is separable, so the M x M bins of a
box are ``Wy @ F @ Wx^T`` with ``Wy [M, H]`` and ``Wx [M, W]`` interpolation weights.

Same values as torchvision's ``roi_align(aligned=True)``; the backward is a pair of matmuls
instead of a scatter, which made the baseline head's training step ~10x faster on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_weights(lo: Tensor, hi: Tensor, bins: int, samples: int, size: int) -> Tensor:
    """Interpolation weights ``[N, bins, size]`` along one axis for boxes spanning
    ``[lo, hi]`` (continuous coords, pixel centres at integers): each bin averages
    ``samples`` evenly spaced bilinear samples, with torchvision's border rules."""
    steps = (torch.arange(bins * samples, device=lo.device, dtype=lo.dtype) + 0.5) / (bins * samples)
    coords = lo[:, None] + steps * (hi - lo)[:, None]  # [N, P]
    inside = ((coords >= -1) & (coords <= size)).to(lo.dtype)
    c = coords.clamp(0, size - 1)
    low = c.floor()
    frac = c - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    weights = torch.zeros(*coords.shape, size, device=lo.device, dtype=lo.dtype)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights.view(-1, bins, samples, size).mean(2)


def roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int = 2) -> Tensor:
    """features [B, C, H, W]; rois [N, 5] (batch index, x1, y1, x2, y2 in input pixels)
    -> [N, C, output_size, output_size], as ``torchvision.ops.roi_align(..., aligned=True)``."""
    n, m = rois.shape[0], output_size
    channels, height, width = features.shape[1:]
    if n == 0:
        return features.new_zeros(0, channels, m, m)
    boxes = rois[:, 1:].to(features.dtype) * spatial_scale - 0.5
    wy = axis_weights(boxes[:, 1], boxes[:, 3], m, sampling_ratio, height)  # [N, M, H]
    wx = axis_weights(boxes[:, 0], boxes[:, 2], m, sampling_ratio, width)   # [N, M, W]
    batch_index = rois[:, 0].long()
    out = features.new_empty(n, channels, m, m)
    for b in torch.unique(batch_index).tolist():  # one pair of matmuls per image, not per box
        sel = torch.nonzero(batch_index == b).flatten()
        rows = torch.einsum("nmh,chw->ncmw", wy[sel], features[b])
        out[sel] = torch.einsum("ncmw,nkw->ncmk", rows, wx[sel])
    return out
