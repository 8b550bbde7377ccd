"""Runs that would succeed without meaning anything are refused or reported: a split whose GT
no query matches, AP on the training images by default, config values out of range."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from torchvision.ops import box_iou

from mfcache.cache.stats import STATS_ATTR, group_stats
from mfcache.config import (
    RANGES,
    EvalConfig,
    ExtractConfig,
    HeadConfig,
    TrainConfig,
    check_config,
    resolve_run_config,
)
from mfcache.errors import MfcacheError
from mfcache.stages import train as training
from mfcache.stages.extract import extract
from tests.helpers.cli import invoke

EXTRACT = ExtractConfig(topk=10, target_size=16, block_size=4, num_workers=0, device="cpu")
FAST = ["train.batch_size=2", "train.num_workers=0", "train.device=cpu", "train.log_every=1"]


def error_lines(result) -> list[str]:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def cache(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("meaning") / "cache"
    summaries = {
        split: extract(
            detector="demo",
            images=shapes_data / split,
            out=out,
            config=EXTRACT,
            annotations=shapes_data / "annotations" / f"{split}.json",
            progress=False,
        )
        for split in ("train", "val")
    }
    return out, summaries


# --- matched GT and box recall, per split ---


def oracle(shapes_data, cache_dir, split, min_iou):
    """The counts by brute force: every (query, GT) IoU in original pixels, from the
    annotation file and the cached boxes, without the stats module."""
    coco = json.loads((shapes_data / "annotations" / f"{split}.json").read_text())
    group = zarr.open_group(cache_dir / split, mode="r")
    gt_total = matched = recalled = 0
    for row, image_id in enumerate(group["index/image_id"][:]):
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id and not a.get("iscrowd", 0)]
        gt_total += len(anns)
        (ih, iw), (oh, ow) = group["index/input_hw"][row], group["index/orig_hw"][row]
        boxes = torch.as_tensor(group["boxes"][row], dtype=torch.float64) * torch.tensor([ow / iw, oh / ih] * 2)
        gt = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float64)
        if len(anns):
            recalled += int((box_iou(boxes, gt).max(0).values >= 0.5).sum())
        gt_id, gt_iou = group["targets/gt_id"][row], group["targets/gt_iou"][row]
        matched += len({int(g) for g, iou in zip(gt_id, gt_iou) if g >= 0 and iou >= min_iou})
    return gt_total, matched, recalled


@pytest.mark.parametrize("split", ["train", "val"])
def test_extract_records_matched_gt_and_box_recall(cache, shapes_data, split):
    cache_dir, summaries = cache
    stats = summaries[split].match
    assert stats is not None and stats.images == len(
        json.loads((shapes_data / "annotations" / f"{split}.json").read_text())["images"]
    )
    gt_total, matched, recalled = oracle(shapes_data, cache_dir, split, 0.5)
    assert (stats.gt_instances, stats.matched, stats.recalled, stats.min_iou) == (gt_total, matched, recalled, 0.5)
    assert 0 < stats.matched <= stats.gt_instances and gt_total > 0
    assert zarr.open_group(cache_dir / split, mode="r").attrs[STATS_ATTR] == stats.to_dict()


def test_extract_and_inspect_print_the_counts(cache, tmp_path):
    cache_dir, summaries = cache
    line = summaries["train"].match.line()
    assert line.startswith("matched GT ") and "box recall@0.5" in line
    out = invoke("inspect", cache_dir)
    assert out.exit_code == 0, out.output
    assert f"targets: {summaries['train'].match.line()}" in " ".join(out.output.split())

    # a cache written before extraction recorded the counts: inspect computes the same ones
    old = tmp_path / "old"
    shutil.copytree(cache_dir, old)
    for split in ("train", "val"):
        group = zarr.open_group(old / split, mode="r+")
        group.attrs.__delitem__(STATS_ATTR)
    again = invoke("inspect", old)
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert f"targets: {summaries['val'].match.line()} (computed now" in text


def test_training_refuses_a_split_without_positives(cache, tmp_path):
    cache_dir, _ = cache
    best = float(zarr.open_group(cache_dir / "train", mode="r")["targets/gt_iou"][:].max())
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--cache",
        cache_dir,
        "--out",
        run,
        "--set",
        "train.steps=2",
        "--set",
        f"train.min_iou={min(1.0, best + 1e-3)}",
        *sum((["--set", s] for s in FAST), []),
        "-q",
    )
    lines = error_lines(result)
    assert len(lines) == 1 and "nothing to train on" in lines[0] and "train.min_iou" in lines[0], result.output
    assert not (run / "checkpoint.pt").exists()


def test_training_warns_when_few_gt_are_matched(cache, tmp_path):
    cache_dir, _ = cache
    group = zarr.open_group(cache_dir / "train", mode="r")
    total = group_stats(group).gt_instances
    # a threshold at which some but fewer than half of the GT instances have a training query
    for t in np.linspace(0.5, 1.0, 51):
        if 0 < group_stats(group, float(t)).matched < total / 2:
            break
    else:
        pytest.skip("no threshold gives a few matched GT on this cache")
    result = invoke(
        "train",
        "--cache",
        cache_dir,
        "--out",
        tmp_path / "run",
        "--set",
        "train.steps=1",
        "--set",
        f"train.min_iou={t}",
        *sum((["--set", s] for s in FAST), []),
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "matched GT" in result.output


def test_a_split_without_gt_is_refused(shapes_data, tmp_path):
    ann = json.loads((shapes_data / "annotations" / "val.json").read_text())
    (tmp_path / "empty.json").write_text(json.dumps({**ann, "annotations": []}))
    extract(
        detector="demo",
        images=shapes_data / "val",
        annotations=tmp_path / "empty.json",
        out=tmp_path / "c",
        config=EXTRACT,
        progress=False,
    )
    with pytest.raises(MfcacheError, match="no ground-truth instances"):
        training.train(
            cache_path=tmp_path / "c", run_dir=tmp_path / "run", config=resolve_run_config(None, FAST), progress=False
        )


# --- eval never scores the training images unless asked ---


def test_eval_on_a_train_only_cache_needs_the_split_named(cache, tmp_path):
    cache_dir, _ = cache
    only_train = tmp_path / "cache"
    shutil.copytree(cache_dir, only_train, ignore=lambda d, names: ["val"] if d == str(cache_dir) else [])
    run = tmp_path / "run"
    training.train(
        cache_path=only_train, run_dir=run, config=resolve_run_config(None, ["train.steps=1", *FAST]), progress=False
    )
    lines = error_lines(invoke("eval", "--cache", only_train, "--run", run, "-q"))
    assert len(lines) == 1 and "--split train" in lines[0]
    assert not (run / "metrics.json").exists()
    ok = invoke("eval", "--cache", only_train, "--run", run, "--split", "train", "-q")
    assert ok.exit_code == 0, ok.output
    assert json.loads((run / "metrics.json").read_text())["split"] == "train"


# --- every config field's range is checked where the config is resolved ---


def test_every_config_field_has_a_range_check():
    for cls in (ExtractConfig, HeadConfig, TrainConfig, EvalConfig):
        assert set(RANGES[cls]) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
        check_config(cls())  # the defaults are in range


BAD = [
    "train.steps=0",
    "train.steps=-5",
    "train.batch_size=0",
    "train.checkpoint_every=0",
    "train.log_every=0",
    "train.lr=nan",
    "train.lr=inf",
    "train.lr=0",
    "train.weight_decay=-1",
    "train.min_iou=1.5",
    "train.betas=[0.9, 1.0]",
    "train.lr_drops=[1.5]",
    "train.num_workers=-1",
    "train.grad_clip=nan",
    "train.seed=-1",
    "train.device=gpu",
    "eval.batch_size=0",
    "eval.max_detections=0",
    "eval.mask_threshold=1.0",
    "head.roi_size=20",
    "head.points=0",
    "head.importance=2.0",
    "head.name=a/b",
    "head.encoder=resnet",
]


@pytest.mark.parametrize("bad", BAD)
def test_an_out_of_range_value_is_a_clear_error(bad):
    field = bad.split("=")[0]
    with pytest.raises(MfcacheError, match=rf"^`{field}` must"):
        resolve_run_config(None, [bad])


def test_every_mistake_is_reported_at_once_before_training(cache, tmp_path):
    cache_dir, _ = cache
    run = tmp_path / "run"
    result = invoke(
        "train",
        "--cache",
        cache_dir,
        "--out",
        run,
        "--set",
        "train.steps=0",
        "--set",
        "train.batch_size=0",
        "--set",
        "train.lr=nan",
        "--set",
        "train.log_every=0",
        "-q",
    )
    lines = error_lines(result)
    assert [line.split()[1] for line in lines] == ["train.steps", "train.batch_size", "train.lr", "train.log_every"]
    assert not run.exists()


def test_extract_config_is_checked():
    with pytest.raises(MfcacheError, match="`extract.topk` must be >= 1"):
        check_config(ExtractConfig(topk=0))
