"""Where masks live: the selected queries' boxes as RoIs, and the image-level variant's crop.

Box-level heads RoIAlign the fused map inside each box (``roi.roi_align``); image-level heads
predict a mask over the whole fused map and crop it (``roi_align_map_per_box``). Both give ``[N, 1, M, M]``
logits inside the box, which is what the cached targets, the losses and the paste expect.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mfcache.heads.roi import axis_weights

FUSED_STRIDE = 4  # the fused map F is at stride 4 (C1's resolution)


def selected_rois(boxes: Tensor, select: Tensor | None) -> Tensor:
    """``boxes [B, K, 4]`` -> RoIs ``[N, 5]`` (batch index, xyxy) of the selected queries,
    row-major over (b, k) like ``queries[select]``."""
    b, k = boxes.shape[:2]
    batch_index = torch.arange(b, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(b, k, 1)
    rois = torch.cat([batch_index, boxes], dim=-1)
    return rois.reshape(-1, 5) if select is None else rois[select]


def roi_align_map_per_box(
    maps: Tensor, boxes: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 1
) -> Tensor:
    """One map per box: ``maps [N, C, H, W]``, ``boxes [N, 4]`` xyxy input px ->
    ``[N, C, M, M]``, RoIAlign (aligned=True) of map n inside box n, batched as
    ``Wy_n @ map_n @ Wx_n^T``."""
    n, m = boxes.shape[0], output_size
    if n == 0:
        return maps.new_zeros(0, maps.shape[1], m, m)
    b = boxes.to(torch.promote_types(maps.dtype, torch.float32)) * spatial_scale - 0.5  # see roi.roi_align_image
    wy = axis_weights(b[:, 1], b[:, 3], m, sampling_ratio, maps.shape[-2])  # [N, M, H]
    wx = axis_weights(b[:, 0], b[:, 2], m, sampling_ratio, maps.shape[-1])  # [N, M, W]
    return torch.einsum("nmh,nchw,nkw->ncmk", wy, maps, wx)
