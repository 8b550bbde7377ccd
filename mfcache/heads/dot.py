"""The paper's mask predictor: dot products between a query and feature vectors.

Box-level: ``q . R`` with R the RoI features. Image-level: ``q . F`` over the whole fused
map of the query's image (its own extent, never a batch's padding), then the box's crop
resampled to M x M (one bilinear sample per bin, as pasting a full-image mask would). RoIAlign is linear, so the two differ only by
the crop's sampling; the image-level variant costs a full-map logit per query, which is
what the paper's region ablation measures. The cache holds GT crops inside each box only,
so both are supervised inside the box (the paper's image-level head also sees outside it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mfcache.heads.region import FUSED_STRIDE, roi_align_map_per_box
from mfcache.heads.roi import rows_per_image


def dot_crops(queries: Tensor, fused: Sequence[Tensor], rois: Tensor, output_size: int, sampling_ratio: int) -> Tensor:
    """``queries [N, C]``, ``fused``: one ``[C, h_b, w_b]`` map per image, ``rois [N, 5]`` ->
    ``[N, 1, M, M]``: ``q . F[b]`` over the whole map of each query's image (one matmul per
    image, not per query), cropped to the box."""

    def rows(b: int, sel: Tensor) -> Tensor:
        full = torch.einsum("nc,chw->nhw", queries[sel], fused[b])[:, None]
        return roi_align_map_per_box(full, rois[sel, 1:], output_size, 1.0 / FUSED_STRIDE, sampling_ratio)

    return rows_per_image(rois[:, 0].long(), rows, fused[0].new_empty(0, 1, output_size, output_size))


class DotPredictor(nn.Module):
    """``queries [N, C]``, ``roi_features [N, C, M, M]`` -> logits ``[N, 1, M, M]`` = q . R / sqrt(C).

    Without ``roi_features`` (no other part of the head needs them) R = RoIAlign(F) is never
    formed: RoIAlign is linear, so q . RoIAlign(F) = RoIAlign(q . F), the same logits from a
    one-channel map (``fused``: one ``[C, h_b, w_b]`` map per image, ``rois [N, 5]``), at 1/C of
    the interpolation work.

    ``affine``: the logits become ``s * q . R / sqrt(C) + b`` with learned scalars s (init 1)
    and b (init 0), a temperature and an offset as many mask heads learn (same logits at init)."""

    def __init__(self, *, channels: int, roi_size: int, sampling_ratio: int = 2, affine: bool = False):
        super().__init__()
        self.scale, self.roi_size, self.sampling_ratio = 1.0 / math.sqrt(channels), roi_size, sampling_ratio
        self.logit_scale = nn.Parameter(torch.ones(())) if affine else None
        self.logit_bias = nn.Parameter(torch.zeros(())) if affine else None

    def forward(
        self, *, queries: Tensor, fused: Sequence[Tensor], rois: Tensor, roi_features: Tensor | None = None, **_
    ) -> Tensor:
        if roi_features is not None:
            dots = torch.einsum("nc,nchw->nhw", queries, roi_features)[:, None]
        else:
            dots = dot_crops(queries, fused, rois, self.roi_size, self.sampling_ratio)
        if self.logit_scale is None:
            return dots * self.scale
        return dots * (self.scale * self.logit_scale) + self.logit_bias


class ImageDotPredictor(DotPredictor):
    """The image-level region: always the full-map logits ``q . F[b] / sqrt(C)`` ``[N, H, W]``,
    cropped to each box with one bilinear sample per bin (RoI features, if another part of the
    head made them, are not used)."""

    def __init__(self, *, channels: int, roi_size: int, affine: bool = False):
        super().__init__(channels=channels, roi_size=roi_size, sampling_ratio=1, affine=affine)

    def forward(self, *, queries: Tensor, fused: Sequence[Tensor], rois: Tensor, **_) -> Tensor:
        return super().forward(queries=queries, fused=fused, rois=rois)
