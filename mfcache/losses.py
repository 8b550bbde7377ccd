"""Mask losses on the RoI grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_targets(targets: Tensor, size: int) -> Tensor:
    """[N, S, S] bool crops -> [N, size, size] float in [0, 1] (area-averaged, so a
    downsampled edge pixel is fractional rather than aliased)."""
    t = targets.float()[:, None]
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode="area" if t.shape[-1] > size else "bilinear",
                          **({} if t.shape[-1] > size else {"align_corners": False}))
    return t[:, 0]


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Mean over N of 1 - dice(sigmoid(logits), targets); both [N, M, M]."""
    prob = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    dice = (2 * (prob * t).sum(1) + eps) / (prob.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


def mask_losses(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """logits [N, 1, M, M] or [N, M, M]; targets [N, M, M] float -> {"bce", "dice"} (means)."""
    logits = logits.reshape(targets.shape)
    return {
        "bce": F.binary_cross_entropy_with_logits(logits, targets),
        "dice": dice_loss(logits, targets),
    }
