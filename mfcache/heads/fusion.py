"""The fused feature map F = neck(C1) + upsample(mapper(F_e(E_level))) at stride 4.

A batch's maps are zero-padded to its largest image, and nothing of F may depend on that
padding (an image's masks never depend on its batch mates): F is computed for each image on
its own valid maps, exactly as for the image alone, and kept as one map per image. The image
encoders, the upsampling's border clamp, the neck's bias and its GroupNorm statistics all see
the image alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_gn(in_channels: int, out_channels: int) -> nn.Sequential:
    """The paper's C1 neck: 1x1 conv + GroupNorm (32 groups, or fewer if channels need)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1), nn.GroupNorm(math.gcd(32, out_channels), out_channels)
    )


class PixelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of ``[n, C, h, w]`` at each pixel (learned per-channel affine)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def fused_norm(kind: str, channels: int) -> nn.Module | None:
    """``head.fused_norm``: None (the paper's raw F), a per-pixel LayerNorm or a per-image GroupNorm."""
    if kind == "none":
        return None
    return PixelLayerNorm(channels) if kind == "layer" else nn.GroupNorm(math.gcd(32, channels), channels)


def image_valid_region(x: Tensor, b: int, hw: list[int] | None) -> Tensor:
    """``x [B, C, H, W]`` -> image ``b``'s valid ``[1, C, h, w]`` (``hw`` = (h, w); None: all of
    it), dense and channels-last: on the CPU, a strided view of the padded batch sends the
    convolutions' weight gradients down a slow path."""
    own = x[b : b + 1] if hw is None else x[b : b + 1, :, : hw[0], : hw[1]]
    return own.contiguous(memory_format=torch.channels_last)


class FusedMap(nn.Module):
    """``levels``: the head's levels of E, ``[B, D, H_l, W_l]`` each; ``c1 [B, C1, H, W]`` or
    None; ``level_hw [B, L, 2]`` and ``c1_hw [B, 2]`` the valid (h, w) of each image's maps
    (None: the whole maps) -> F as a list of B maps ``[d', s*h_b, s*w_b]``, s = stride(level) / 4
    and ``h_b x w_b`` image b's valid level (C1 zero-padded to it, as the detector's own input
    padding was). Nothing after F needs the images padded to one batch, so none is.

    ``encoder`` maps the list of levels to a refined list (multi-scale encoders) or is
    applied to the chosen level alone (single-map encoders); ``mapper`` is the channel
    mapper d -> d'; ``neck`` maps C1 to d'; ``norm`` (optional) normalises the sum, each image
    on its own (:func:`fused_norm`).
    """

    def __init__(
        self,
        *,
        encoder: nn.Module | None,
        multi_scale: bool,
        index: int,
        upsample: float,
        mapper: nn.Module,
        neck: nn.Module | None,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder, self.multi_scale, self.index, self.upsample = encoder, multi_scale, index, upsample
        self.mapper, self.neck, self.norm = mapper, neck, norm

    def forward(
        self, levels: list[Tensor], c1: Tensor | None, level_hw: Tensor | None = None, c1_hw: Tensor | None = None
    ) -> list[Tensor]:
        batch = levels[0].shape[0]
        level_sizes = [[None] * len(levels)] * batch if level_hw is None else level_hw.tolist()
        c1_sizes = [None] * batch if c1_hw is None else c1_hw.tolist()
        maps = []
        for b in range(batch):  # each image alone: its own borders, its own statistics
            own_levels = [image_valid_region(x, b, hw) for x, hw in zip(levels, level_sizes[b])]
            maps.append(self.image(own_levels, None if c1 is None else image_valid_region(c1, b, c1_sizes[b]))[0])
        return maps

    def image(self, levels: list[Tensor], c1: Tensor | None) -> Tensor:
        """F of images whose maps are all valid: ``[n, D, h_l, w_l]`` levels, ``c1 [n, C1, h, w]``
        -> ``[n, d', s*h, s*w]``."""
        if self.encoder is not None and self.multi_scale:
            memory = self.encoder(levels, output_level=self.index)  # the other levels' outputs are never computed
        else:
            memory = levels[self.index]
            if self.encoder is not None:
                memory = self.encoder(memory)
        fused = F.interpolate(
            self.mapper(memory), scale_factor=float(self.upsample), mode="bilinear", align_corners=False
        )
        if self.neck is not None:
            c1 = self.neck(c1)
            fused = fused + F.pad(c1, (0, fused.shape[-1] - c1.shape[-1], 0, fused.shape[-2] - c1.shape[-2]))
        return fused if self.norm is None else self.norm(fused)
