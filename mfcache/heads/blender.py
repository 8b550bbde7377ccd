"""BlendMask's blender (Chen et al., 2020) as a mask predictor.

K bases are predicted from the fused map F by a small conv stack (3x3 conv, ReLU, 1x1 conv); each query predicts K
attention maps of m x m. Per box: RoIAlign the bases at R x R, upsample the attentions to
R x R (bilinear), softmax them over K, and sum bases x attentions -> mask logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfcache.heads.region import FUSED_STRIDE
from mfcache.heads.roi import roi_align


def blend(bases: Tensor, attentions: Tensor) -> Tensor:
    """``bases [N, K, R, R]`` (RoI-aligned), ``attentions [N, K, m, m]`` (logits) ->
    ``[N, 1, R, R]`` = sum_k bases_k * softmax_k(upsample_R(attentions))_k."""
    up = F.interpolate(attentions, size=bases.shape[-2:], mode="bilinear", align_corners=False)
    return (bases * up.softmax(1)).sum(1, keepdim=True)


class BlenderPredictor(nn.Module):
    """``queries [N, C]``, ``fused``: one ``[C, h_b, w_b]`` map per image, ``rois [N, 5]`` ->
    logits ``[N, 1, R, R]`` with R = ``roi_size`` (the paper's 56 is not among M = 16/32/64).
    The bases are computed on each image's map alone (the 3x3 conv's zero padding at its own
    border)."""

    def __init__(self, *, channels: int, bases: int, attn_size: int, roi_size: int):
        super().__init__()
        self.num_bases, self.attn_size, self.roi_size = bases, attn_size, roi_size
        hidden = min(channels, 64)  # the tower runs on the whole stride-4 map: keep it light
        self.bases = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, bases, 1),
        )
        self.attention = nn.Linear(channels, bases * attn_size * attn_size)

    def forward(self, *, queries: Tensor, fused: Sequence[Tensor], rois: Tensor, **_) -> Tensor:
        # channels-last: for an NCHW map the conv's weight gradient takes a slow CPU path (~5x here)
        bases = [self.bases(f[None].contiguous(memory_format=torch.channels_last))[0] for f in fused]
        bases = roi_align(bases, rois, self.roi_size, 1.0 / FUSED_STRIDE, sampling_ratio=2)
        attentions = self.attention(queries).view(-1, self.num_bases, self.attn_size, self.attn_size)
        return blend(bases, attentions)
