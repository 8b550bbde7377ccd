"""Masks for categories the head never saw: `train.categories` (learn from some categories,
the others' instances out of the loss) and AP per category in `mfcache eval`."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO

from mfcache.config import resolve_run_config
from mfcache.errors import MfcacheError
from mfcache.metrics import coco_evaluate
from mfcache.stages import train as training
from mfcache.stages.categories import learned_mask, subset_summary
from mfcache.stages.evaluate import evaluate
from tests.helpers.cli import invoke

SETTINGS = [
    "train.batch_size=8",
    "train.num_workers=0",
    "train.device=cpu",
    "train.min_iou=0.1",
    "head.roi_size=16",
    "train.steps=1",
]


@pytest.fixture(scope="module")
def ann_category(shapes_data) -> dict[int, str]:
    """Train annotation id -> its category's name."""
    data = json.loads((shapes_data / "annotations" / "train.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    return {a["id"]: names[a["category_id"]] for a in data["annotations"]}


def trained_on(cache, run, monkeypatch, *extra) -> list[str]:
    """Train one step (the whole train split) and return the category of every query the head
    learned from (as it reached the head)."""
    seen: list[int] = []
    original = training.run_head

    def recording(model, batch, select=None):
        seen.extend(batch.gt_id[select].tolist())
        return original(model, batch, select)

    monkeypatch.setattr(training, "run_head", recording)
    training.train(cache_path=cache, run_dir=run, config=resolve_run_config(None, [*SETTINGS, *extra]), progress=False)
    return seen


def test_a_subset_run_learns_from_its_categories_alone(cache, tmp_path, monkeypatch, ann_category):
    everything = [ann_category[i] for i in trained_on(cache, tmp_path / "all", monkeypatch)]
    present = sorted(set(everything))
    assert len(present) >= 3  # the full run learns from several categories, so there is something to hold out
    learned = present[:-2]
    held = present[-2:]
    subset = [
        ann_category[i]
        for i in trained_on(cache, tmp_path / "some", monkeypatch, f"train.categories={','.join(learned)}")
    ]
    assert subset and set(subset) <= set(learned)
    # exactly the full run's positives less the held-out ones: dropped, nothing added
    assert sorted(subset) == sorted(c for c in everything if c not in held)
    log = [json.loads(line) for line in (tmp_path / "some" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["positives"] == len(subset)
    stored = json.loads((tmp_path / "some" / "config.json").read_text())["config"]
    assert stored["train"]["categories"] == learned


def test_learned_mask_drops_only_the_excluded_instances():
    gt_id = torch.tensor([[5, -1, 7, 9], [7, 7, 2, -1]])
    assert learned_mask(gt_id, torch.tensor([7, 9])).tolist() == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    assert learned_mask(gt_id, torch.zeros(0, dtype=torch.int64)).all()


def test_the_start_of_training_says_what_is_held_out(cache, tmp_path):
    result = invoke(
        "train",
        "--cache",
        cache,
        "--out",
        tmp_path / "run",
        *[a for s in SETTINGS for a in ("--set", s)],
        "--set",
        "train.categories=ring,star,crescent,ell",
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "categories=[ring, star, crescent, ell]" in text
    assert (
        "masks learned from ring, star, crescent, ell only; held out (instances left out of the loss): "
        "cross, triangle" in text
    )


def test_an_unknown_category_is_one_line_before_any_work(cache, tmp_path):
    with pytest.raises(
        MfcacheError,
        match=r"train.categories: 'circle' not among the categories of split 'train'"
        r".*\(ring, star, crescent, ell, cross, triangle\)",
    ):
        training.train(
            cache_path=cache,
            run_dir=tmp_path / "run",
            progress=False,
            config=resolve_run_config(None, [*SETTINGS, "train.categories=ring,circle"]),
        )
    assert not (tmp_path / "run" / "config.json").exists()
    result = invoke("train", "--cache", cache, "--out", tmp_path / "cli", "--set", "train.categories=Ring")
    assert result.exit_code == 1 and result.output.startswith("error: train.categories: 'Ring' not among")
    with pytest.raises(MfcacheError, match="`train.categories` must be distinct non-empty names"):
        resolve_run_config(None, ["train.categories=ring,ring"])
    assert resolve_run_config(None, ['train.categories=["ring", "star"]']).train.categories == ("ring", "star")


def test_eval_reports_ap_per_category_and_the_held_out_mean(cache, shapes_data, tmp_path):
    run = tmp_path / "run"
    training.train(
        cache_path=cache,
        run_dir=run,
        progress=False,
        config=resolve_run_config(None, [*SETTINGS, "train.steps=2", "train.categories=ring,star,crescent,ell"]),
    )
    metrics = evaluate(cache_path=cache, run_dir=run, progress=False, device="cpu")
    per = metrics["per_category"]
    assert list(per) == ["ring", "star", "crescent", "ell", "cross", "triangle"]
    with_gt = [e for e in per.values() if e["num_gt"]]
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())["annotations"]
    assert sum(e["num_gt"] for e in per.values()) == len(val) and len(with_gt) >= 2
    for iou_type in ("segm", "bbox"):
        assert np.mean([e[f"{iou_type}_AP"] for e in with_gt]) == pytest.approx(metrics[iou_type]["AP"], abs=1e-9)
        assert all(e[f"{iou_type}_AP"] is None for e in per.values() if not e["num_gt"])
    subset = metrics["category_subset"]
    assert subset["learned"] == ["ring", "star", "crescent", "ell"] and subset["held_out"] == ["cross", "triangle"]
    assert subset == subset_summary(per, ("ring", "star", "crescent", "ell"))
    held = [per[n]["segm_AP"] for n in ("cross", "triangle") if per[n]["segm_AP"] is not None]
    assert subset["segm_AP_held_out"] == (pytest.approx(np.mean(held)) if held else None)
    assert json.loads((run / "metrics.json").read_text())["category_subset"] == subset


def _square(ann_id, image_id, cat, x, y, side):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "iscrowd": 0,
        "area": float(side * side),
        "bbox": [x, y, side, side],
        "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]],
    }


def test_per_category_ap_on_a_known_answer():
    """Category 1 found perfectly, category 2 missed, category 3 has no GT: AP 1, 0, None, and
    the overall AP is their mean over the categories with GT."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 100, "width": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
        "annotations": [_square(1, 1, 1, 10, 10, 30), _square(2, 1, 2, 60, 60, 30)],
    }
    gt.createIndex()
    rle = mask_utils.frPyObjects(gt.dataset["annotations"][0]["segmentation"], 100, 100)[0]
    rle["counts"] = rle["counts"].decode()
    results = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [10, 10, 30, 30], "segmentation": rle}]
    metrics = coco_evaluate(gt, results, per_category=True)
    per = metrics["per_category"]
    assert per == {
        "a": {"id": 1, "num_gt": 1, "segm_AP": pytest.approx(1.0), "bbox_AP": pytest.approx(1.0)},
        "b": {"id": 2, "num_gt": 1, "segm_AP": 0.0, "bbox_AP": 0.0},
        "c": {"id": 3, "num_gt": 0, "segm_AP": None, "bbox_AP": None},
    }
    assert metrics["segm"]["AP"] == pytest.approx(0.5)
    assert "per_category" not in coco_evaluate(
        gt, results
    )  # only when asked: the other callers' dicts stay as they were
    assert "per_category" not in coco_evaluate(gt, results, per_category=True, class_agnostic=True)
