"""The fused feature map F = neck(C1) + upsample(mapper(F_e(E_level))) at stride 4."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def conv_gn(in_channels: int, out_channels: int) -> nn.Sequential:
    """The paper's C1 neck: 1x1 conv + GroupNorm (32 groups, or fewer if channels need)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.GroupNorm(math.gcd(32, out_channels), out_channels))


class FusedMap(nn.Module):
    """``levels``: the head's levels of E, ``[B, D, H_l, W_l]`` each; ``c1 [B, C1, <=sH, <=sW]``
    or None -> F ``[B, d', sH, sW]`` where s = stride(level) / 4 and ``sH x sW`` is the
    upsampled level (C1 is zero-padded to it, as the detector's batch padding was).

    ``encoder`` maps the list of levels to a refined list (multi-scale encoders) or is
    applied to the chosen level alone (single-map encoders); ``mapper`` is the channel
    mapper d -> d'; ``neck`` maps C1 to d'.
    """

    def __init__(self, *, encoder: nn.Module | None, multi_scale: bool, index: int, upsample: int,
                 mapper: nn.Module, neck: nn.Module | None):
        super().__init__()
        self.encoder, self.multi_scale, self.index, self.upsample = encoder, multi_scale, index, upsample
        self.mapper, self.neck = mapper, neck

    def forward(self, levels: list[Tensor], c1: Tensor | None) -> Tensor:
        if self.encoder is not None and self.multi_scale:
            memory = self.encoder(levels)[self.index]
        else:
            memory = levels[self.index]
            if self.encoder is not None:
                memory = self.encoder(memory)
        fused = F.interpolate(self.mapper(memory), scale_factor=float(self.upsample), mode="bilinear", align_corners=False)
        if self.neck is not None:
            c1 = self.neck(c1)
            fused = fused + F.pad(c1, (0, fused.shape[-1] - c1.shape[-1], 0, fused.shape[-2] - c1.shape[-2]))
        return fused
