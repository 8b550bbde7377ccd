"""How well a split's cached queries cover its ground truth, i.e. whether training on it means
anything.

Two numbers per split, over its complete images and their non-crowd GT instances:

- **matched**: GT instances that are the best-overlapping GT (``targets/gt_id``) of at least one
  cached query at box IoU >= ``min_iou`` (``targets/gt_iou``). These are the only instances a
  head trains on (``train.min_iou``); zero means training has no positives at all.
- **recalled**: GT instances that some cached box overlaps at IoU >= 0.5, whichever GT that
  box overlaps most: the detector's box recall at 0.5 within its cached top-k, an upper
  bound on what any mask head can find. GT boxes are the annotations' ``bbox`` (the boxes COCO
  box AP uses), or the segmentation's box where an annotation has none.

A split of several views per image (``extract --views``) counts each image once, at its view 0
row: the other views' frames are flipped or cropped, so the annotations' boxes are not theirs.

Extraction records both in the split's attrs (:data:`STATS_ATTR`, at :data:`REPORT_IOU`);
for caches written before that, :func:`split_stats` computes them from the stored arrays.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import zarr
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mfcache.cache.schema import DONE

STATS_ATTR = "match_stats"
REPORT_IOU = 0.5  # the train.min_iou default: extraction records the matched count at it
RECALL_IOU = 0.5
FEW_MATCHED = 0.5  # train warns when fewer than this share of the GT instances is matched


@dataclass(frozen=True)
class MatchStats:
    images: int  # complete images counted
    gt_instances: int  # their non-crowd GT instances
    min_iou: float
    matched: int  # GT instances that are a cached query's best match at IoU >= min_iou
    recalled: int  # GT instances some cached box overlaps at IoU >= RECALL_IOU
    best_iou: float  # the highest query-GT box IoU stored (0 if none)

    def line(self) -> str:
        """``matched GT 812/1000 (81.2%) at box IoU >= 0.5; box recall@0.5 850/1000 (85.0%)``."""

        def share(n: int) -> str:
            return f"{n}/{self.gt_instances} ({100 * n / self.gt_instances:.1f}%)" if self.gt_instances else "0/0"

        return (
            f"matched GT {share(self.matched)} at box IoU >= {self.min_iou:g}; "
            f"box recall@{RECALL_IOU:g} {share(self.recalled)}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MatchStats:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def matched_count(gt_id: np.ndarray, gt_iou: np.ndarray, min_iou: float) -> int:
    """``gt_id``, ``gt_iou [N, K]`` of complete images -> how many distinct (image, GT) pairs
    some query trains on (``gt_id >= 0`` and ``gt_iou >= min_iou``, the training rule)."""
    rows, cols = np.nonzero((gt_id >= 0) & (gt_iou >= min_iou))
    return len(np.unique(np.stack([rows, gt_id[rows, cols]], axis=1), axis=0)) if len(rows) else 0


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[K, 4]``, ``[G, 4]`` xyxy -> ``[K, G]`` IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def _gt_boxes(coco: COCO, image_id: int) -> np.ndarray:
    """``[G, 4]`` xyxy original px of an image's non-crowd annotations."""
    boxes = []
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("iscrowd", 0):
            continue
        if isinstance(ann.get("bbox"), (list, tuple)) and len(ann["bbox"]) == 4:
            x, y, w, h = map(float, ann["bbox"])
        else:
            try:
                x, y, w, h = mask_utils.toBbox(coco.annToRLE(ann)).tolist()
            except Exception:  # an annotation without a usable box: it can never be recalled
                x, y, w, h = 0.0, 0.0, 0.0, 0.0
        boxes.append([x, y, x + w, y + h])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def view0_done(group: zarr.Group, views: int) -> np.ndarray:
    """The complete view 0 rows of a split of ``views`` rows per image (image-major)."""
    done = np.flatnonzero(group["index/done"][:] == DONE)
    return done[done % views == 0]


def group_stats(group: zarr.Group, min_iou: float = REPORT_IOU, views: int = 1) -> MatchStats:
    """:class:`MatchStats` of a split group of ``views`` rows per image, computed from its stored
    arrays and annotations (complete images only, at view 0: pending and skipped rows hold fill values)."""
    done = view0_done(group, views)
    gt_id = group["targets/gt_id"][:][done]
    gt_iou = group["targets/gt_iou"][:][done]
    boxes = group["boxes"][:][done].astype(np.float64)
    scale = (group["index/orig_hw"][:][done] / group["index/input_hw"][:][done])[:, [1, 0, 1, 0]]
    boxes = boxes * scale[:, None, :]  # input px -> original px, as the targets were matched
    coco = COCO()
    coco.dataset = json.loads(group["annotations"][:].tobytes())
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    gt_instances = recalled = 0
    for row, image_id in enumerate(group["index/image_id"][:][done].tolist()):
        gt = _gt_boxes(coco, int(image_id))
        gt_instances += len(gt)
        if len(gt) and boxes.shape[1]:
            recalled += int((_box_iou(boxes[row], gt).max(0) >= RECALL_IOU).sum())
    return MatchStats(
        images=len(done),
        gt_instances=gt_instances,
        min_iou=float(min_iou),
        matched=matched_count(gt_id, gt_iou, min_iou),
        recalled=recalled,
        best_iou=float(gt_iou[gt_id >= 0].max()) if (gt_id >= 0).any() else 0.0,
    )


def stored_stats(group: zarr.Group) -> MatchStats | None:
    """The stats extraction recorded in the split's attrs, or None (an older cache)."""
    stored = dict(group.attrs).get(STATS_ATTR)
    return MatchStats.from_dict(stored) if stored else None


def split_stats(group: zarr.Group, min_iou: float = REPORT_IOU, views: int = 1) -> MatchStats:
    """:class:`MatchStats` at ``min_iou``: the GT counts recorded at extraction when there are
    any (only the matched count, cheap, is recomputed for this threshold), else all computed."""
    stored = stored_stats(group)
    if stored is None:
        return group_stats(group, min_iou, views)
    if stored.min_iou == min_iou:
        return stored
    done = view0_done(group, views)
    matched = matched_count(group["targets/gt_id"][:][done], group["targets/gt_iou"][:][done], min_iou)
    return MatchStats(**{**stored.to_dict(), "min_iou": float(min_iou), "matched": matched})
