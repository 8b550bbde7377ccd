"""The paper's box-level baseline head: dot products between each query and the fused
feature map RoIAligned inside its box."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfcache.heads.base import HeadOutput, MaskHead
from mfcache.heads.roi import roi_align

FUSED_STRIDE = 4


def selected_rois(boxes: Tensor, select: Tensor | None) -> Tensor:
    """``boxes [B, K, 4]`` -> RoIs ``[N, 5]`` (batch index, xyxy) of the selected queries,
    row-major over (b, k) like ``queries[select]``."""
    b, k = boxes.shape[:2]
    batch_index = torch.arange(b, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(b, k, 1)
    rois = torch.cat([batch_index, boxes], dim=-1)
    return rois.reshape(-1, 5) if select is None else rois[select]


class BoxDotHead(MaskHead):
    """F = proj(C1) + upsample(E_level) at stride 4; R_i = RoIAlign(F, b_i) at M x M;
    mask_i = q_i' . R_i / sqrt(d') with q_i' a linear map of the query."""

    def __init__(self, *, d_model: int, c1_channels: int, channels: int, roi_size: int, level: int, use_c1: bool):
        super().__init__()
        self.levels, self.uses_c1, self.roi_size = (level,), use_c1, roi_size
        self.memory_proj = nn.Conv2d(d_model, channels, 1) if channels != d_model else nn.Identity()
        self.c1_proj = (nn.Conv2d(c1_channels, channels, 1) if c1_channels != channels else nn.Identity()) if use_c1 else None
        self.query_proj = nn.Linear(d_model, channels)
        self.scale = 1.0 / math.sqrt(channels)

    def fused_map(self, level: Tensor, c1: Tensor | None) -> Tensor:
        """[B, D, H, W] at stride 8 (+ [B, C, <=2H, <=2W] at stride 4) -> [B, d', 2H, 2W]."""
        fused = F.interpolate(self.memory_proj(level), scale_factor=2.0, mode="bilinear", align_corners=False)
        if self.c1_proj is not None:
            c1 = self.c1_proj(c1)
            fused = fused + F.pad(c1, (0, fused.shape[-1] - c1.shape[-1], 0, fused.shape[-2] - c1.shape[-2]))
        return fused

    def forward(self, queries: Tensor, boxes: Tensor, levels: list[Tensor], c1: Tensor | None,
                select: Tensor | None = None) -> HeadOutput:
        fused = self.fused_map(levels[0], c1)
        rois = roi_align(fused, selected_rois(boxes, select), output_size=self.roi_size,
                         spatial_scale=1.0 / FUSED_STRIDE, sampling_ratio=2)
        q = self.query_proj(queries.reshape(-1, queries.shape[-1]) if select is None else queries[select])
        logits = torch.einsum("nc,nchw->nhw", q, rois) * self.scale
        return HeadOutput(mask_logits=logits[:, None])
