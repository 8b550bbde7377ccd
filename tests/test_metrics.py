"""COCO evaluation on a tiny in-memory GT: perfect, degraded and empty results."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from rich.console import Console

from mfcache.metrics import SEGM_KEYS, coco_evaluate, metrics_table, results_from_detections
from mfcache.ops.masks import crop_mask_targets, encode_rle, paste_masks


def _ellipse(h: int, w: int, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    ys, xs = np.mgrid[:h, :w] + 0.5
    return ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (counts list, column-major, starting with a run of zeros)."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def _rle_ann(ann_id: int, image_id: int, cat: int, mask: np.ndarray, crowd: int = 0) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    segm = _uncompressed_rle(mask) if crowd else {**rle, "counts": rle["counts"].decode()}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "iscrowd": crowd,
        "segmentation": segm,
        "area": float(mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


@pytest.fixture(scope="module")
def coco_gt() -> COCO:
    """2 images, 2 categories (ids 1 and 3); polygon and RLE masks; one crowd region;
    small and medium objects, no large ones."""
    anns = [
        {  # a 40x40 square: medium (area 1600 > 32**2)
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[5.0, 10.0, 45.0, 10.0, 45.0, 50.0, 5.0, 50.0]],
            "area": 1600.0,
            "bbox": [5.0, 10.0, 40.0, 40.0],
        },
        _rle_ann(2, 1, 3, _ellipse(64, 80, 62.0, 30.0, 9.0, 6.0)),
        _rle_ann(3, 1, 1, _ellipse(64, 80, 60.0, 52.0, 5.0, 7.0)),
        _rle_ann(4, 7, 1, _ellipse(48, 48, 12.0, 12.0, 10.0, 10.0), crowd=1),
        {  # a triangle: small
            "id": 5,
            "image_id": 7,
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": [[30.0, 30.0, 46.0, 30.0, 38.0, 44.0]],
            "area": 112.0,
            "bbox": [30.0, 30.0, 16.0, 14.0],
        },
    ]
    dataset = {
        "images": [
            {"id": 1, "height": 64, "width": 80, "file_name": "a.jpg"},
            {"id": 7, "height": 48, "width": 48, "file_name": "b.jpg"},
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
        "annotations": anns,
    }
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _gt_masks(coco: COCO) -> list[tuple[dict, np.ndarray]]:
    """(annotation, [H, W] bool mask) of every non-crowd GT."""
    anns = coco.loadAnns(coco.getAnnIds(iscrowd=False))
    return [(a, coco.annToMask(a).astype(bool)) for a in anns]


def _results(pairs, shift: int = 0) -> list[dict]:
    out = []
    for ann, mask in pairs:
        m = torch.from_numpy(np.roll(mask, shift, axis=(0, 1)))[None]
        out.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "score": 1.0,
                "bbox": list(ann["bbox"]),
                "segmentation": encode_rle(m)[0],
            }
        )
    return out


def _assert_plain(metrics: dict) -> None:
    json.dumps(metrics, allow_nan=False)
    for scores in metrics.values():
        assert tuple(scores) == SEGM_KEYS
        assert all(v is None or type(v) is float for v in scores.values())


def test_perfect_results_score_one(coco_gt):
    results = _results(_gt_masks(coco_gt))
    before = json.dumps(results)
    metrics = coco_evaluate(coco_gt, results)
    assert json.dumps(results) == before  # inputs untouched
    _assert_plain(metrics)
    for iou_type in ("segm", "bbox"):
        m = metrics[iou_type]
        assert [m[k] for k in SEGM_KEYS[:5]] == pytest.approx([1.0] * 5, abs=1e-9)
        assert m["APl"] is None  # no large GT


def test_degraded_results_score_lower(coco_gt):
    pairs = _gt_masks(coco_gt)
    shifted = coco_evaluate(coco_gt, _results(pairs, shift=4), iou_types=("segm",))
    assert set(shifted) == {"segm"}
    assert shifted["segm"]["AP"] < 0.9
    gen = np.random.default_rng(0)
    garbled = [(a, gen.random(m.shape) < 0.5) for a, m in pairs]
    metrics = coco_evaluate(coco_gt, _results(garbled))
    assert metrics["segm"]["AP"] < 0.2
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)  # boxes still exact


def test_empty_results_score_zero(coco_gt):
    metrics = coco_evaluate(coco_gt, [])
    _assert_plain(metrics)
    for iou_type in ("segm", "bbox"):
        m = metrics[iou_type]
        assert [m[k] for k in SEGM_KEYS] == [0.0, 0.0, 0.0, 0.0, 0.0, None]


def test_bad_inputs(coco_gt):
    with pytest.raises(ValueError, match="not in the GT"):
        coco_evaluate(coco_gt, [{"image_id": 99, "category_id": 1, "score": 1.0, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(coco_gt, [{"image_id": 1, "category_id": 1, "score": 1.0, "bbox": [0, 0, 1, 1]}])


def test_results_from_detections():
    boxes = torch.tensor([[1.234, 2.0, 11.0, 5.5], [0.0, 0.0, 3.0, 4.0]])
    rles = encode_rle(torch.zeros(2, 8, 12, dtype=torch.bool))
    res = results_from_detections(5, boxes, torch.tensor([0.9, 0.1]), torch.tensor([3, 1]), rles)
    assert res[0] == {
        "image_id": 5,
        "category_id": 3,
        "bbox": [1.23, 2.0, 9.77, 3.5],
        "score": pytest.approx(0.9),
        "segmentation": rles[0],
    }
    assert type(res[1]["category_id"]) is int and type(res[1]["score"]) is float
    plain = results_from_detections(5, boxes, torch.tensor([0.9, 0.1]), torch.tensor([3, 1]), None)
    assert "segmentation" not in plain[0]
    json.dumps(res)
    with pytest.raises(ValueError):
        results_from_detections(5, boxes, torch.tensor([0.9]), torch.tensor([3, 1]), None)


def test_pipeline_from_gt_masks(coco_gt):
    # GT mask -> box-level target -> pasted back -> RLE -> COCO results: near-perfect AP.
    results = []
    for image_id in coco_gt.getImgIds():
        pairs = [(a, m) for a, m in _gt_masks(coco_gt) if a["image_id"] == image_id]
        gt = torch.from_numpy(np.stack([m for _, m in pairs]))
        xywh = torch.tensor([a["bbox"] for a, _ in pairs])
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        targets = crop_mask_targets(gt, boxes, torch.arange(len(pairs)), 28)
        pasted = paste_masks(targets.float(), boxes, tuple(gt.shape[1:]))
        results += results_from_detections(
            image_id,
            boxes,
            torch.ones(len(pairs)),
            torch.tensor([a["category_id"] for a, _ in pairs]),
            encode_rle(pasted),
        )
    metrics = coco_evaluate(coco_gt, results)
    assert metrics["segm"]["AP50"] == pytest.approx(1.0) and metrics["segm"]["AP"] >= 0.8
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_metrics_table_rows():
    scores = {"AP": 0.4567, "AP50": 0.6, "AP75": 0.5, "APs": 0.1, "APm": 0.2, "APl": None}
    metrics = {"segm": scores, "bbox": scores, "n_images": 2, "box_filled": {"segm": scores}}
    console = Console(file=io.StringIO(), width=120)
    console.print(metrics_table(metrics, title="val"))
    text = console.file.getvalue()
    assert "box_filled segm" in text and "45.7" in text and "60.0" in text
    assert "n_images" not in text
    assert metrics_table(metrics).row_count == 3
