"""A small Mask R-CNN-style FCN mask predictor: RoI features at M/2 -> 4 x (conv3x3, ReLU)
-> 2x deconv, ReLU -> 1x1 conv -> logits at M (like Mask R-CNN's 14 -> 28)."""

from __future__ import annotations

from torch import Tensor, nn


class FCNPredictor(nn.Module):
    """``roi_features [N, C, M/2, M/2]`` -> logits ``[N, 1, M, M]``."""

    def __init__(self, *, channels: int, hidden: int, convs: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1), nn.ReLU()]
        layers += [nn.ConvTranspose2d(hidden, hidden, 2, stride=2), nn.ReLU(), nn.Conv2d(hidden, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, *, roi_features: Tensor, **_) -> Tensor:
        return self.layers(roi_features)
