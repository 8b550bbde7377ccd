"""Training on a subset of the categories (``train.categories``) and reporting per category.

A class-agnostic mask head on a frozen open-vocabulary detector is a text-prompted instance
segmenter only if its masks carry over to categories it never learned from. To measure that,
a run learns from some categories alone: a query whose best-matching GT instance
(``targets/gt_id``, matched against *every* category's GT at extraction) belongs to another
category is dropped from the loss, neither a positive nor a negative, exactly as if that object
were not there. (Removing the held-out instances from the annotation file instead would let
such queries match a neighbouring seen instance at a lower IoU and learn its mask.)

Evaluation then reports AP per category (:func:`mfcache.metrics.coco_evaluate`), and for a run
trained on a subset, the mean over the categories it learned from and over the held-out ones
(:func:`subset_summary`), scored with the detector's own labels.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor

from mfcache.errors import MfcacheError


def category_names(coco: COCO) -> dict[int, str]:
    """``{category id: name}`` of a dataset, in id order."""
    return {int(c["id"]): str(c["name"]) for c in sorted(coco.dataset.get("categories", []), key=lambda c: c["id"])}


def held_out(coco: COCO, learned: tuple[str, ...], where: str) -> list[str]:
    """The dataset's category names not in ``learned`` (``train.categories``; () = all learned).
    Raises one line naming the unknown names and the valid ones."""
    names = list(category_names(coco).values())
    if not learned:
        return []
    unknown = [n for n in learned if n not in names]
    if unknown:
        raise MfcacheError(
            f"train.categories: {', '.join(map(repr, unknown))} not among the categories of {where} "
            f"({', '.join(names)})"
        )
    return [n for n in names if n not in learned]


def held_out_annotations(coco: COCO, held: list[str]) -> Tensor:
    """``[A]`` int64, sorted: the annotation ids of the ``held`` categories' instances (the
    ``gt_id`` values whose queries :func:`learned_mask` leaves out of the loss)."""
    ids = {i for i, n in category_names(coco).items() if n in held}
    return torch.tensor(
        sorted(int(a["id"]) for a in coco.dataset.get("annotations", []) if int(a["category_id"]) in ids),
        dtype=torch.int64,
    )


def learned_mask(gt_id: Tensor, excluded: Tensor) -> Tensor:
    """``gt_id [B, K]`` (-1 = unmatched) -> ``[B, K]`` bool: False where the query's matched GT
    is one of the ``excluded [A]`` annotation ids (a held-out category's instance)."""
    if excluded.numel() == 0:
        return torch.ones_like(gt_id, dtype=torch.bool)
    return ~torch.isin(gt_id, excluded.to(gt_id.device))


def check_learnable(
    gt_id: np.ndarray, gt_iou: np.ndarray, excluded: Tensor, min_iou: float, where: str, learned: tuple[str, ...]
) -> None:
    """Refuse a subset with no positive left: no query of the split (``gt_id``, ``gt_iou [N, K]``
    of its complete images) matches a learned category's instance at ``min_iou``."""
    positive = (gt_id >= 0) & (gt_iou >= min_iou) & ~np.isin(gt_id, excluded.numpy())
    if not positive.any():
        raise MfcacheError(
            f"train.categories={','.join(learned)}: no query of {where} matches an instance of "
            f"these categories at box IoU >= train.min_iou={min_iou:g}: nothing to train on"
        )


def subset_summary(per_category: dict[str, dict], learned: tuple[str, ...]) -> dict:
    """For a run trained on ``learned`` categories: the mean segm and bbox AP over the learned
    categories and over the held-out ones (those of ``per_category``, as
    :func:`mfcache.metrics.coco_evaluate` reports it, not in ``learned``), categories without
    GT (AP None) left out of the means; ``gap``: learned minus held-out segm AP."""
    groups = {
        "learned": [n for n in per_category if n in learned],
        "held_out": [n for n in per_category if n not in learned],
    }
    summary: dict = dict(groups)
    for key, names in groups.items():
        for metric in ("segm_AP", "bbox_AP"):
            values = [per_category[n][metric] for n in names if per_category[n].get(metric) is not None]
            summary[f"{metric}_{key}"] = float(np.mean(values)) if values else None
    a, b = summary["segm_AP_learned"], summary["segm_AP_held_out"]
    summary["segm_AP_gap"] = None if a is None or b is None else a - b
    return summary
