"""A learned mask-IoU head (Mask Scoring R-CNN style): predicts the IoU between a
predicted mask and its (unseen) ground truth from the RoI features and the mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MLP_GRID = 8  # the MLP read-out flattens an 8 x 8 map (S = 16 exactly; larger S average-pooled to it)


class MaskIoUHead(nn.Module):
    """``roi_features [N, C, S, S]``, ``mask_logits [N, 1, M, M]`` -> quality ``[N]`` in (0, 1).

    [features, mask] -> conv3x3, ReLU -> conv3x3 stride 2, ReLU -> read-out: ``pool`` (global
    average pool + one linear layer) or ``mlp`` (the paper's, as Mask Scoring R-CNN: flatten
    the ``hidden x 8 x 8`` map, adaptively average-pooled to 8 x 8 so M = 16/32/64 share one
    size, then linear 256, ReLU, linear 256, ReLU, linear 1: the layout of the mask is kept).

    The mask enters as a detached probability resized to S: the quality loss trains this
    branch only, never the mask predictor."""

    def __init__(self, *, channels: int, hidden: int = 64, readout: str = "pool", mlp_hidden: int = 256):
        super().__init__()
        if readout == "pool":
            head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1)]
        elif readout == "mlp":  # the paper's flatten + MLP
            head = [
                nn.AdaptiveAvgPool2d(MLP_GRID),
                nn.Flatten(),
                nn.Linear(hidden * MLP_GRID * MLP_GRID, mlp_hidden),
                nn.ReLU(),
                nn.Linear(mlp_hidden, mlp_hidden),
                nn.ReLU(),
                nn.Linear(mlp_hidden, 1),
            ]
        else:
            raise ValueError(f"readout must be pool or mlp, got {readout!r}")
        self.layers = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.ReLU(),
            *head,
        )

    def forward(self, roi_features: Tensor, mask_logits: Tensor) -> Tensor:
        prob = mask_logits.detach().sigmoid()
        if prob.shape[-1] != roi_features.shape[-1]:
            prob = F.interpolate(prob, size=roi_features.shape[-2:], mode="bilinear", align_corners=False)
        return self.layers(torch.cat([roi_features, prob], 1)).sigmoid()[:, 0]
