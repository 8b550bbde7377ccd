"""COCO evaluation: result dicts from detections, pycocotools COCOeval, a rich summary table.

Metric values are plain Python floats in [0, 1], or None where COCO has nothing to score
(pycocotools' -1: no non-crowd GT in that size range); both survive ``json.dumps``
(None becomes null, where NaN would produce invalid JSON).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.table import Table
from torch import Tensor

__all__ = ["SEGM_KEYS", "coco_evaluate", "metrics_table", "results_from_detections"]

# The first six of COCOeval.stats, in order.
SEGM_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def results_from_detections(
    image_id: int,
    boxes_xyxy: Tensor,
    scores: Tensor,
    category_ids: Tensor,
    rles: list[dict] | None,
) -> list[dict]:
    """COCO result dicts for one image's N detections, in input order, none skipped.

    boxes_xyxy: [N, 4] xyxy, pixels of the original image (COCO's coordinates).
    scores: [N]; category_ids: [N] COCO category ids (not contiguous label indices).
    rles: N compressed RLEs (``encode_rle``) or None for box-only results.
    Each dict: image_id, category_id (int), score (float), bbox [x, y, w, h] (floats rounded
    to 2 decimals), and segmentation when rles is given.
    """
    n = boxes_xyxy.shape[0]
    if scores.shape != (n,) or category_ids.shape != (n,):
        raise ValueError(
            f"boxes {tuple(boxes_xyxy.shape)}, scores {tuple(scores.shape)} and "
            f"category_ids {tuple(category_ids.shape)} disagree on N"
        )
    if rles is not None and len(rles) != n:
        raise ValueError(f"{len(rles)} RLEs for {n} boxes")
    boxes = boxes_xyxy.detach().to("cpu", torch.float64)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    # Python's round on float64 gives the shortest repr (12.35, not 12.350000381...),
    # which keeps result files small.
    bboxes = [[round(v, 2) for v in row] for row in xywh.tolist()]
    results = [
        {"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": float(s)}
        for b, s, c in zip(bboxes, scores.detach().cpu().tolist(), category_ids.cpu().tolist())
    ]
    if rles is not None:
        for r, rle in zip(results, rles):
            r["segmentation"] = rle
    return results


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO with no detections (``COCO.loadRes`` cannot take an empty list)."""
    dt = COCO()
    dt.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def coco_evaluate(
    coco_gt: COCO,
    results: Sequence[dict],
    iou_types: Sequence[str] = ("segm", "bbox"),
    image_ids: Sequence[int] | None = None,
    class_agnostic: bool = False,
) -> dict[str, dict[str, float | None]]:
    """Run pycocotools' COCOeval for each iou type over every image of ``coco_gt``, or only
    over ``image_ids`` (e.g. leaving out images skipped at extraction, whose GT would
    otherwise count as misses).

    results: COCO result dicts (``image_id``, ``category_id``, ``score``, ``bbox`` [x, y, w, h],
        ``segmentation`` compressed RLE); not modified. Every image_id must be in coco_gt;
        images without results count as misses.
    Returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}``: floats in [0, 1], or
    None where pycocotools reports -1 (no non-crowd GT of that size). With no results every
    score is 0.0 (None still where there is no GT to find).

    For "segm" the results' ``bbox`` is dropped before ``loadRes`` so that a detection's area
    (which decides small/medium/large) is its mask area, not its box area — as detectron2
    does. pycocotools' progress prints are swallowed.

    ``class_agnostic``: every GT instance and result is one class (pycocotools ``useCats =
    0``: a detection matches the best GT of any category, crowd regions of any category are
    ignored, ``maxDets`` counts an image's detections of all categories); the results'
    ``category_id`` is then ignored.
    """
    gt_images = set(coco_gt.getImgIds())
    if image_ids is not None:
        if unknown := set(int(i) for i in image_ids) - gt_images:
            raise ValueError(f"image_ids not in the GT, e.g. {min(unknown)}")
        gt_images = set(int(i) for i in image_ids)
    stray = {r["image_id"] for r in results} - gt_images
    if stray:
        raise ValueError(f"results for {len(stray)} image(s) not in the GT, e.g. {min(stray)}")

    metrics: dict[str, dict[str, float | None]] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            needed, dropped = "segmentation", "bbox"
        elif iou_type == "bbox":
            needed, dropped = "bbox", "segmentation"
        else:
            raise ValueError(f"unsupported iou type {iou_type!r}; use 'segm' or 'bbox'")
        if any(needed not in r for r in results):
            raise ValueError(f"{iou_type} evaluation needs '{needed}' in every result")
        # Shallow copies: loadRes writes id/area/iscrowd (and more) into the dicts it gets.
        dts = [{k: v for k, v in r.items() if k != dropped} for r in results]
        if class_agnostic and coco_gt.getCatIds():  # useCats=0 still reads only the GT's category ids
            dts = [{**d, "category_id": min(coco_gt.getCatIds())} for d in dts]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dts) if dts else _empty_results(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = sorted(gt_images)
            evaluator.params.useCats = 0 if class_agnostic else 1
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {
            key: (None if stat < 0 else float(stat))
            for key, stat in zip(SEGM_KEYS, evaluator.stats[: len(SEGM_KEYS)])
        }
    return metrics


def _metric_rows(metrics: Mapping) -> list[tuple[str, Mapping]]:
    """(label, {AP..APl}) for each iou-type entry, one level of nesting allowed:
    ``{"segm": {...}}`` -> "segm"; ``{"box_filled": {"segm": {...}}}`` -> "box_filled segm".
    Entries of any other shape (counts, settings) are skipped."""

    def is_scores(v: object) -> bool:
        return isinstance(v, Mapping) and any(k in v for k in SEGM_KEYS)

    rows = []
    for name, value in metrics.items():
        if is_scores(value):
            rows.append((str(name), value))
        elif isinstance(value, Mapping):
            rows.extend((f"{name} {sub}", v) for sub, v in value.items() if is_scores(v))
    return rows


def metrics_table(metrics: Mapping, title: str = "COCO AP") -> Table:
    """A rich Table with one row per iou type (see ``_metric_rows``), in the dict's order,
    and columns AP, AP50, AP75, APs, APm, APl as percentages with one decimal;
    "-" where a value is None or missing. The title and a caption say so (metrics.json, like
    ``metrics``, holds fractions in [0, 1])."""
    table = Table(title=f"{title}, in %", caption="metrics.json holds the same AP as fractions in [0, 1]")
    table.add_column("")
    for key in SEGM_KEYS:
        table.add_column(key, justify="right")
    for label, scores in _metric_rows(metrics):
        cells = []
        for key in SEGM_KEYS:
            value = scores.get(key)
            cells.append("-" if value is None else f"{100 * float(value):.1f}")
        table.add_row(label, *cells)
    return table
