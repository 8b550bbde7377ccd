"""Per-query training targets, computed once at extraction (the detector is frozen).

Each cached query is paired with the non-crowd GT instance its box overlaps most (box IoU)
and that instance's mask resampled inside the query's box at ``size x size``. Crowd regions
are never targets. Whether a pair is used for training (IoU threshold) is a training option,
so the cache stays neutral.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from mfcache.data.coco import GroundTruth
from mfcache.ops.masks import crop_mask_targets


def scale_boxes(boxes: Tensor, from_hw, to_hw) -> Tensor:
    """``[..., 4]`` xyxy boxes from an image of ``from_hw`` pixels to one of ``to_hw``."""
    (fh, fw), (th, tw) = from_hw, to_hw
    factor = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], dtype=boxes.dtype, device=boxes.device)
    return boxes * factor


def match_queries(boxes: Tensor, gt: GroundTruth) -> tuple[Tensor, Tensor]:
    """``boxes [K, 4]`` xyxy original px -> (position in ``gt`` of the non-crowd instance
    with the highest box IoU ``[K]`` long, -1 if none overlaps; that IoU ``[K]`` float)."""
    k = boxes.shape[0]
    keep = torch.nonzero(~gt.iscrowd).flatten()
    if keep.numel() == 0:
        return torch.full((k,), -1, dtype=torch.long), torch.zeros(k)
    iou = box_iou(boxes.float(), gt.boxes[keep].float())
    best_iou, best = iou.max(dim=1)
    index = torch.where(best_iou > 0, keep[best], torch.full_like(best, -1))
    return index, best_iou


def query_targets(boxes: Tensor, input_hw, gt: GroundTruth, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Targets of one image's cached queries.

    boxes: ``[K, 4]`` xyxy in detector-input pixels; ``input_hw``: that input's (h, w);
    ``gt``: the image's annotations at original size.
    Returns ``gt_id [K]`` (COCO annotation id, -1 = none), ``gt_iou [K]`` and
    ``masks [K, size, size]`` bool.
    """
    orig_hw = tuple(gt.masks.shape[-2:])
    boxes = scale_boxes(boxes.float(), input_hw, orig_hw)
    index, iou = match_queries(boxes, gt)
    masks = crop_mask_targets(gt.masks, boxes, index, size)
    gt_id = torch.where(index >= 0, gt.ann_ids[index.clamp(min=0)] if len(gt.ann_ids) else index, index)
    return gt_id, iou, masks
