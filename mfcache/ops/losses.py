"""Mask losses on the RoI grid."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mfcache.config import HeadConfig, TrainConfig


def resize_targets(targets: Tensor, size: int) -> Tensor:
    """[N, S, S] bool crops -> [N, size, size] float in [0, 1] (area-averaged, so a
    downsampled edge pixel is fractional rather than aliased)."""
    t = targets.float()[:, None]
    if t.shape[-1] != size:
        t = F.interpolate(
            t,
            size=(size, size),
            mode="area" if t.shape[-1] > size else "bilinear",
            **({} if t.shape[-1] > size else {"align_corners": False}),
        )
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


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``maps [N, C, H, W]`` at ``points [N, P, 2]`` (x, y) in [0, 1] of
    the map (pixel centres at (i + 0.5) / size) -> ``[N, C, P]``. Points within half a pixel
    of the border take the border value (not a blend with zeros, as padding would give)."""
    grid = (2 * points - 1)[:, :, None]  # [N, P, 1, 2]
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]


def uncertain_points(
    logits: Tensor, *, num_points: int, oversample: float, importance: float, generator: torch.Generator | None = None
) -> Tensor:
    """PointRend's training-time sampling: draw ``oversample * num_points`` uniform random
    points, keep the ``importance * num_points`` most uncertain (logit nearest 0, read off
    bilinearly) and add uniform random points up to ``num_points``.
    ``logits [N, 1, M, M]`` -> points ``[N, num_points, 2]`` (x, y) in [0, 1]; no gradient."""
    n = logits.shape[0]
    candidates = int(oversample * num_points)
    important = int(importance * num_points)
    coords = torch.rand(n, candidates, 2, device=logits.device, dtype=logits.dtype, generator=generator)
    with torch.no_grad():
        uncertainty = -point_sample(logits.detach(), coords)[:, 0].abs()  # [N, candidates]
        top = uncertainty.topk(important, dim=1).indices
    chosen = coords.gather(1, top[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - important, 2, device=logits.device, dtype=logits.dtype, generator=generator)
    return torch.cat([chosen, rest], 1)


def point_values(
    logits: Tensor,
    targets: Tensor,
    *,
    num_points: int,
    oversample: float,
    importance: float,
    generators: Sequence[tuple[int, torch.Generator]] | None = None,
) -> tuple[Tensor, Tensor]:
    """The point loss's samples: ``num_points`` points per mask chosen by :func:`uncertain_points`
    on ``logits [N, 1, M, M]``, and (logits ``[N, P]``, targets ``[N, P]``) there. ``targets
    [N, S, S]`` (bool or float) cover the same box at any size S. The points are (x, y) in
    [0, 1] of the box: the logits are read off bilinearly at M, the targets at their own size S,
    so with S > M (the cached crop, ``head.point_targets = "cache"``) a point near the boundary
    gets the finer target's value, as PointRend samples the full-size GT mask.

    ``generators``: ``(rows, generator)`` per image, in row order (the rows of one image are
    consecutive), so an image's points depend on its own generator alone, never on its batch
    mates or on which rank holds it; None draws from the global generator."""
    logits = logits.reshape(len(targets), 1, *logits.shape[-2:])
    options = {"num_points": num_points, "oversample": oversample, "importance": importance}
    if generators is None:
        points = uncertain_points(logits, **options)
    else:
        rows = [n for n, _ in generators]
        if sum(rows) != len(logits):
            raise ValueError(f"generators cover {sum(rows)} rows, the loss has {len(logits)}")
        points = (
            torch.cat(
                [uncertain_points(part, generator=g, **options) for part, (_, g) in zip(logits.split(rows), generators)]
            )
            if rows
            else logits.new_zeros(0, num_points, 2)
        )
    point_logits = point_sample(logits, points)[:, 0]
    return point_logits, point_sample(targets[:, None].to(point_logits.dtype), points)[:, 0]


def point_mask_losses(
    logits: Tensor,
    targets: Tensor,
    *,
    num_points: int,
    oversample: float,
    importance: float,
    generators: Sequence[tuple[int, torch.Generator]] | None = None,
) -> dict[str, Tensor]:
    """BCE + dice (means) on the points of :func:`point_values` (PointRend's / Mask2Former's
    point loss): logits ``[N, 1, M, M]``, targets ``[N, S, S]`` -> ``{"bce", "dice"}``."""
    point_logits, point_targets = point_values(
        logits, targets, num_points=num_points, oversample=oversample, importance=importance, generators=generators
    )
    return {
        "bce": F.binary_cross_entropy_with_logits(point_logits, point_targets),
        "dice": dice_loss(point_logits, point_targets),
    }


def image_generators(
    rows: Sequence[int], image_ids: Sequence[int], *, seed: int, step: int, device: torch.device | str = "cpu"
) -> list[tuple[int, torch.Generator]]:
    """One generator per image for :func:`point_mask_losses`, seeded by (``seed``, ``step``,
    image id): a pure function of the image and the step, whatever the batch or the rank."""
    out = []
    for n, image_id in zip(rows, image_ids):
        key = hashlib.blake2b(f"{seed}:{step}:{image_id}".encode(), digest_size=8).digest()
        out.append((int(n), torch.Generator(device=device).manual_seed(int.from_bytes(key, "little") >> 1)))
    return out


def mask_iou(logits: Tensor, targets: Tensor, threshold: float = 0.5) -> Tensor:
    """IoU ``[N]`` of the binarised predicted masks (prob > threshold) with targets > 0.5;
    logits ``[N, 1, M, M]``, targets ``[N, M, M]``. An empty union counts as IoU 1."""
    pred = (logits.detach().reshape(targets.shape).sigmoid() > threshold).flatten(1)
    gt = (targets > 0.5).flatten(1)
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def quality_loss(quality: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """MSE between predicted quality ``[N]`` and the true IoU of the predicted masks
    (computed at the head's resolution M, no gradient into the masks)."""
    return F.mse_loss(quality, mask_iou(logits, targets))


class MaskPrediction(Protocol):
    """What a loss reads of a head's output (:class:`mfcache.heads.base.HeadOutput` is one):
    ``mask_logits [N, 1, M, M]`` and ``quality [N]`` or None."""

    mask_logits: Tensor
    quality: Tensor | None


def head_loss(
    out: MaskPrediction,
    targets: Tensor,
    head: HeadConfig,
    train: TrainConfig,
    generators: Sequence[tuple[int, torch.Generator]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of a head's output on its selected detections: ``out.mask_logits
    [N, 1, M, M]``, ``targets [N, S, S]`` bool or float, the GT crops at the size they are
    cached at (S = ``extract --target-size``; or already at M). BCE + dice on the whole RoI
    (targets :func:`resize_targets` to M) or on sampled points (``head.loss``; the points'
    targets read at S or, with ``head.point_targets = "roi"``, at M; ``generators``: see
    :func:`point_mask_losses`), weighted by ``train.bce_weight`` / ``train.dice_weight``, plus
    ``head.quality_weight`` x the quality regression (at M) when the head predicts mask quality.
    Returns (loss, its parts, unweighted)."""
    roi_targets = resize_targets(targets, out.mask_logits.shape[-1])
    if head.loss == "point":
        parts = point_mask_losses(
            out.mask_logits,
            targets if head.point_targets == "cache" else roi_targets,
            num_points=head.points,
            oversample=head.oversample,
            importance=head.importance,
            generators=generators,
        )
    else:
        parts = mask_losses(out.mask_logits, roi_targets)
    targets = roi_targets
    loss = train.bce_weight * parts["bce"] + train.dice_weight * parts["dice"]
    if out.quality is not None:  # learned mask-IoU: regress the true IoU at the head's M
        parts["quality"] = quality_loss(out.quality, out.mask_logits, targets)
        loss = loss + head.quality_weight * parts["quality"]
    return loss, parts
