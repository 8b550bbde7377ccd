"""The paper's mask predictor: dot products between a query and feature vectors.

Box-level: ``q . R`` with R the RoI features. Image-level: ``q . F`` over the whole fused
map of the query's image, then the box's crop resampled to M x M (one bilinear sample per
bin, as pasting a full-image mask would). RoIAlign is linear, so the two differ only by
the crop's sampling; the image-level variant costs a full-map logit per query, which is
what the paper's region ablation measures. The cache holds GT crops inside each box only,
so both are supervised inside the box (the paper's image-level head also sees outside it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mfcache.heads.region import FUSED_STRIDE, crop_maps


class DotPredictor(nn.Module):
    """``queries [N, C]``, ``roi_features [N, C, M, M]`` -> logits ``[N, 1, M, M]`` = q . R / sqrt(C)."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, *, queries: Tensor, roi_features: Tensor, **_) -> Tensor:
        return torch.einsum("nc,nchw->nhw", queries, roi_features)[:, None] * self.scale


class ImageDotPredictor(nn.Module):
    """``queries [N, C]``, ``fused [B, C, H, W]``, ``rois [N, 5]`` -> logits ``[N, 1, M, M]``:
    the full-map logits ``q . F[b] / sqrt(C)`` ``[N, H, W]``, cropped to each box."""

    def __init__(self, *, channels: int, roi_size: int):
        super().__init__()
        self.scale, self.roi_size = 1.0 / math.sqrt(channels), roi_size

    def forward(self, *, queries: Tensor, fused: Tensor, rois: Tensor, **_) -> Tensor:
        image = rois[:, 0].long()
        full = fused.new_empty(len(queries), *fused.shape[-2:])
        for b in torch.unique(image).tolist():  # one matmul per image, not per query
            sel = torch.nonzero(image == b).flatten()
            full[sel] = torch.einsum("nc,chw->nhw", queries[sel], fused[b])
        return crop_maps(full[:, None] * self.scale, rois[:, 1:], self.roi_size, 1.0 / FUSED_STRIDE, sampling_ratio=1)
