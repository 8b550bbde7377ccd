"""A learned mask-IoU head (Mask Scoring R-CNN style): predicts the IoU between a
predicted mask and its (unseen) ground truth from the RoI features and the mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskIoUHead(nn.Module):
    """``roi_features [N, C, S, S]``, ``mask_logits [N, 1, M, M]`` -> quality ``[N]`` in (0, 1).

    The mask enters as a detached probability resized to S: the quality loss trains this
    branch only, never the mask predictor."""

    def __init__(self, *, channels: int, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1),
        )

    def forward(self, roi_features: Tensor, mask_logits: Tensor) -> Tensor:
        prob = mask_logits.detach().sigmoid()
        if prob.shape[-1] != roi_features.shape[-1]:
            prob = F.interpolate(prob, size=roi_features.shape[-2:], mode="bilinear", align_corners=False)
        return self.layers(torch.cat([roi_features, prob], 1)).sigmoid()[:, 0]
