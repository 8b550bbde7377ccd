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

__all__ = ["SEGM_KEYS", "category_table", "coco_evaluate", "metrics_table", "results_from_detections"]

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
    per_category: bool = False,
) -> dict[str, dict]:
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

    ``per_category`` (not with ``class_agnostic``): also ``"per_category": {name: {"id",
    "num_gt", "<iou type>_AP", ...}}``, each category's AP over IoU 0.50:0.95 (all areas, 100
    detections, as detectron2 and mmdet report it), None for a category without non-crowd GT
    in the scored images; the mean of these (over the categories with GT) is the overall AP.
    """
    gt_images = set(coco_gt.getImgIds())
    if image_ids is not None:
        if unknown := set(int(i) for i in image_ids) - gt_images:
            raise ValueError(f"image_ids not in the GT, e.g. {min(unknown)}")
        gt_images = set(int(i) for i in image_ids)
    stray = {r["image_id"] for r in results} - gt_images
    if stray:
        raise ValueError(f"results for {len(stray)} image(s) not in the GT, e.g. {min(stray)}")

    metrics: dict[str, dict] = {}
    categories: dict[str, dict] = _category_entries(coco_gt, gt_images) if per_category and not class_agnostic else {}
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
            key: (None if stat < 0 else float(stat)) for key, stat in zip(SEGM_KEYS, evaluator.stats[: len(SEGM_KEYS)])
        }
        for entry, ap in zip(categories.values(), _category_ap(evaluator)):
            entry[f"{iou_type}_AP"] = ap
    if categories:
        metrics["per_category"] = categories
    return metrics


def _category_entries(coco_gt: COCO, image_ids: set[int]) -> dict[str, dict]:
    """``{name: {"id", "num_gt"}}`` for every category of ``coco_gt`` in id order (COCOeval's
    ``catIds`` order); ``num_gt``: its non-crowd instances in ``image_ids``. A name two
    categories share is told apart by its id (``name#id``)."""
    cats = sorted(coco_gt.dataset.get("categories", []), key=lambda c: c["id"])
    names = [str(c["name"]) for c in cats]
    counts: dict[int, int] = {}
    for a in coco_gt.dataset.get("annotations", []):
        if a["image_id"] in image_ids and not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    return {
        (name if names.count(name) == 1 else f"{name}#{c['id']}"): {
            "id": int(c["id"]),
            "num_gt": counts.get(c["id"], 0),
        }
        for name, c in zip(names, cats)
    }


def _category_ap(evaluator: COCOeval) -> list[float | None]:
    """Per category (``params.catIds`` order): the mean of COCOeval's precision ``[T, R, K, A,
    M]`` over IoU thresholds and recall points, area "all", the last maxDets (100), -1 entries
    (no GT) left out, as ``stats[0]`` averages them over all categories at once."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    out = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k]
        p = p[p > -1]
        out.append(float(p.mean()) if p.size else None)
    return out


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


def category_table(per_category: Mapping[str, Mapping], learned: Sequence[str] = ()) -> Table:
    """A rich Table of ``metrics["per_category"]``: one row per category with its GT count and
    segm / bbox AP in %; with ``learned`` (a run's ``train.categories``) a column marks each
    category as learned or held out."""
    table = Table(title="AP per category, in %")
    for name, justify in (("category", "left"), ("GT", "right"), ("segm AP", "right"), ("bbox AP", "right")):
        table.add_column(name, justify=justify)
    if learned:
        table.add_column("masks")
    for name, entry in per_category.items():
        cells = ["-" if entry.get(k) is None else f"{100 * float(entry[k]):.1f}" for k in ("segm_AP", "bbox_AP")]
        table.add_row(
            name,
            str(entry.get("num_gt", "")),
            *cells,
            *(["learned" if name in learned else "held out"] if learned else []),
        )
    return table
