"""``extract --views N``: view 0 is the plain cache row for row, views 1.. carry the flipped /
rescaled image's own detector pass and targets, training draws one view per image per epoch,
eval scores each image once, and another N is another cache; ``--view-crop P`` crops views
1.. (image and GT) with probability P, and leaves a cache without it as it was."""

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.reader import Cache, CacheDataset
from mfcache.cache.schema import ExtractSettings
from mfcache.cache.stats import stored_stats
from mfcache.cache.targets import query_targets
from mfcache.cache.verify import verify
from mfcache.config import ExtractConfig, check_config
from mfcache.data.coco import CocoDataset, GroundTruth
from mfcache.data.views import (
    CROP_SIDES,
    SCALES,
    crop_ground_truth,
    rows_frames,
    view_crop,
    view_preprocess,
    view_transform,
)
from mfcache.detectors import load_detector
from mfcache.errors import MfcacheError
from mfcache.stages.extract import detector_batches, extract
from mfcache.stages.sampling import StepBatches, ViewStepBatches, step_batches
from tests.helpers.cli import invoke

TARGET = 16


def config(views: int, crop: float = 0.0) -> ExtractConfig:
    # batch 2 divides the 2 images of a 4-row block of a 2-view cache: its view-0 rows run through
    # the detector in the batches the 1-view cache's rows do (detector_batches), so the tests below
    # may compare them bit for bit on any CPU (other batch compositions may differ in the last bits)
    return ExtractConfig(
        topk=10,
        target_size=TARGET,
        block_size=4,
        batch_size=2,
        num_workers=0,
        device="cpu",
        c1="store",
        views=views,
        view_crop=crop,
    )


def run_extract(data, out, views, crop=0.0):
    return extract(
        detector="demo",
        images=data / "val",
        annotations=data / "annotations" / "val.json",
        out=out,
        config=config(views, crop),
        progress=False,
    )


@pytest.fixture(scope="module")
def caches(shapes_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    run_extract(shapes_data, root / "one", 1)
    run_extract(shapes_data, root / "two", 2)
    return root / "one", root / "two"


@pytest.fixture(scope="module")
def cropped(shapes_data, tmp_path_factory):
    """Two views, every view 1 cropped (then flipped and rescaled)."""
    out = tmp_path_factory.mktemp("crop") / "cache"
    run_extract(shapes_data, out, 2, crop=1.0)
    return out


def test_view_transforms_are_deterministic_and_varied():
    assert view_transform(7, 0).identity
    for image_id in range(20):
        assert view_transform(image_id, 1) == view_transform(image_id, 1)  # a pure function
        assert view_transform(image_id, 1).flip and not view_transform(image_id, 2).flip
        assert view_transform(image_id, 2).scale in SCALES and view_transform(image_id, 2).scale != 1.0
    assert len({view_transform(i, 1).scale for i in range(20)}) > 1  # scales differ between images


def test_views_never_share_a_detector_batch_and_view0_is_batched_as_the_plain_cache():
    block, size = 8, 2
    plain = detector_batches(np.arange(10), block, size)
    assert plain == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # never across a block, from its first row
    for views, rows_per_block in ((2, block), (4, block), (2, block * 2)):  # size divides block's images
        rows = np.arange(10 * views)
        batches = detector_batches(rows, rows_per_block, size, views)
        assert sorted(j for b in batches for j in b) == rows.tolist()  # every row once
        assert all(len({int(rows[j]) % views for j in b}) == 1 for b in batches)  # one view per batch
        view0 = [[int(rows[j]) // views for j in b] for b in batches if rows[b[0]] % views == 0]
        assert view0 == plain  # the plain cache's images, batch for batch
        # a resumed run (the first block finished) batches the rest as the whole run did
        rest = rows[rows_per_block:]
        assert [[int(rest[j]) for j in b] for b in detector_batches(rest, rows_per_block, size, views)] == [
            [int(rows[j]) for j in b] for b in batches if rows[b[0]] >= rows_per_block
        ]


def test_rows_are_images_times_views_and_view0_is_the_plain_cache(caches):
    one, two = Cache(caches[0]).split("val"), Cache(caches[1]).split("val")
    n = one.num_rows
    assert two.num_rows == 2 * n
    np.testing.assert_array_equal(two.index["image_id"], np.repeat(one.index["image_id"], 2))
    np.testing.assert_array_equal(two.complete_rows, np.arange(0, 2 * n, 2))  # eval/validation: each image once
    np.testing.assert_array_equal(two.index["input_hw"][0::2], one.index["input_hw"])
    for i in range(n):
        a, b = one.read(i), two.read(2 * i)
        for name in ("queries", "boxes", "scores", "labels", "gt_id", "gt_iou", "target_masks", "c1"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(x, y) for x, y in zip(a.levels, b.levels))
    assert verify(caches[1]).ok


def test_the_summary_counts_images_and_views_apart(caches, shapes_data):
    again = run_extract(shapes_data, caches[1], 2)  # a finished cache: nothing written, the same counts
    n = Cache(caches[0]).split("val").num_rows
    assert (again.num_rows, again.views, again.written) == (2 * n, 2, 0)
    assert again.rows_line() == f"{n} images x 2 views ({2 * n} rows)"
    assert run_extract(shapes_data, caches[0], 1).rows_line() == f"{n} images"

    shown = " ".join(invoke("inspect", caches[1]).output.split())
    assert f"split val: {n}/{n} images complete (2 views each, {2 * n} rows)" in shown  # not "n/2n": half done
    assert "per image (2 views)" in shown


def test_view1_targets_are_the_flipped_and_rescaled_ground_truth(caches, shapes_data):
    two = Cache(caches[1]).split("val")
    dataset = CocoDataset(shapes_data / "annotations" / "val.json", shapes_data / "val")
    preprocess = load_detector("demo", device=torch.device("cpu")).info.preprocess
    differs = 0
    for j, image in enumerate(dataset.images):
        sample = two.read(2 * j + 1)
        t = view_transform(image.id, 1)
        assert t.flip and sample.image_id == image.id
        assert tuple(sample.input_hw.tolist()) == view_preprocess(preprocess, t).input_size(image.height, image.width)
        gt = dataset.ground_truth(image)
        # the GT mirrored by hand: masks left-right, boxes x -> W - x
        boxes = gt.boxes.clone()
        boxes[:, 0], boxes[:, 2] = image.width - gt.boxes[:, 2], image.width - gt.boxes[:, 0]
        gt.masks, gt.boxes = gt.masks.flip(-1), boxes
        gt_id, iou, masks = query_targets(sample.boxes, tuple(sample.input_hw.tolist()), gt, TARGET)
        assert torch.equal(sample.gt_id, gt_id) and torch.equal(sample.target_masks, masks)
        assert torch.allclose(sample.gt_iou, iou)
        assert (gt_id >= 0).any()
        plain = two.read(2 * j)
        differs += not torch.equal(plain.boxes, sample.boxes)
    assert differs == len(dataset.images)  # every view 1 is its own detector pass


def test_training_draws_one_view_per_image_per_epoch_deterministically():
    n, bs, views = 8, 2, 4
    sampler = ViewStepBatches(n, bs, seed=5, start=0, stop=16, views=views)
    batches = list(sampler)
    plain = list(StepBatches(n, bs, seed=5, start=0, stop=16))
    assert [[i for i, _ in b] for b in batches] == plain  # the same images, step for step
    drawn = []
    for epoch in range(4):
        keys = [k for b in batches[epoch * 4 : epoch * 4 + 4] for k in b]
        assert sorted(i for i, _ in keys) == list(range(n))  # every image once per epoch
        assert all(0 <= v < views for _, v in keys)
        drawn.append(dict(keys))
    assert len({tuple(sorted(d.items())) for d in drawn}) > 1  # the views change between epochs
    assert len({v for d in drawn for v in d.values()}) > 1
    assert list(ViewStepBatches(n, bs, seed=5, start=6, stop=16, views=views)) == batches[6:]  # resume
    assert list(ViewStepBatches(n, bs, seed=6, start=0, stop=16, views=views)) != batches
    assert type(step_batches(n, bs, 5, 0, 16, views=1)) is StepBatches  # one view: the batches runs always had


def test_dataset_serves_the_drawn_view(caches):
    one = CacheDataset(caches[1], "val", levels=None, c1=False, targets=True)
    every = CacheDataset(caches[1], "val", levels=None, c1=False, targets=True, all_views=True)
    assert len(one) == len(every) == 4 and every.rows.shape == (4, 2)
    a, b, c = every[(3, 0)], every[(3, 1)], one[3]
    assert a.image_id == b.image_id == c.image_id
    assert torch.equal(a.boxes, c.boxes) and not torch.equal(a.boxes, b.boxes)


def test_train_and_eval_on_a_views_cache_score_each_image_once(caches, tmp_path):
    from mfcache.config import resolve_run_config
    from mfcache.stages.evaluate import predict_split
    from mfcache.stages.train import train

    overrides = [
        "train.steps=2",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.device=cpu",
        "train.min_iou=0.1",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    ]
    cfg = resolve_run_config(None, overrides)
    entry = train(cache_path=caches[1], run_dir=tmp_path / "run", config=cfg, split="val", progress=False)
    assert np.isfinite(entry["loss"])
    from mfcache.heads import build_head

    cache = Cache(caches[1])
    data = cache.split("val")
    info = cache.detector
    head = build_head(cfg.head, d_model=info.d_model, c1_channels=info.c1_channels, num_levels=len(info.strides)).eval()
    results = predict_split(head, cfg, data, torch.device("cpu"), progress=False)["head"]
    ids, counts = np.unique([r["image_id"] for r in results], return_counts=True)
    assert set(ids.tolist()) == set(data.index["image_id"].tolist())  # every image scored ...
    assert counts.max() <= 10  # ... once: top-10 detections of its view 0 row, never its view 1 row's too


def test_another_views_is_another_cache(caches, shapes_data):
    with pytest.raises(MfcacheError, match="views=2 .asked for 1"):
        run_extract(shapes_data, caches[1], 1)
    fp = zarr.open_group(str(caches[0]), mode="r").attrs["mfcache"]
    assert fp["extract"]["views"] == 1


def test_recomputed_c1_is_refused_with_views(shapes_data, tmp_path):
    cfg = ExtractConfig(topk=10, target_size=TARGET, num_workers=0, device="cpu", c1="recompute", views=2)
    with pytest.raises(MfcacheError, match="`extract.views` > 1 needs `extract.c1`"):
        extract(
            detector="demo",
            images=shapes_data / "train",
            annotations=shapes_data / "annotations" / "train.json",
            out=tmp_path / "c",
            config=cfg,
            progress=False,
        )


def test_crop_ground_truth_slices_masks_recomputes_boxes_and_drops_empty_instances():
    masks = torch.zeros(4, 10, 12, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # cut by the crop's top and left edges
    masks[1, 6:9, 6:12] = True  # cut by its bottom and right edges
    masks[2, 0:2, 10:12] = True  # outside the crop: dropped
    masks[3] = True  # a crowd region: kept, cropped
    gt = GroundTruth(
        masks=masks,
        boxes=torch.zeros(4, 4),
        category_ids=torch.tensor([1, 2, 3, 4]),
        iscrowd=torch.tensor([False, False, False, True]),
        ann_ids=torch.tensor([10, 11, 12, 13]),
    )
    out = crop_ground_truth(gt, (2, 3, 6, 6))  # rows 2..7, columns 3..8
    assert out.masks.shape == (3, 6, 6)
    assert torch.equal(out.masks, masks[[0, 1, 3], 2:8, 3:9])
    assert out.boxes.tolist() == [[0, 0, 2, 1], [3, 4, 6, 6], [0, 0, 6, 6]]  # xyxy, x2 = last column + 1
    assert out.ann_ids.tolist() == [10, 11, 13] and out.category_ids.tolist() == [1, 2, 4]
    assert out.iscrowd.tolist() == [False, False, True]
    no_crowd = GroundTruth(
        masks=masks[:3],
        boxes=gt.boxes[:3],
        category_ids=gt.category_ids[:3],
        iscrowd=gt.iscrowd[:3],
        ann_ids=gt.ann_ids[:3],
    )
    empty = crop_ground_truth(no_crowd, (9, 0, 1, 1))  # no instance has a pixel there: an empty GT
    assert empty.masks.shape == (0, 1, 1) and empty.boxes.shape == (0, 4) and len(empty.ann_ids) == 0


def test_view_crops_are_deterministic_within_the_image_and_off_by_default():
    hw = (90, 120)
    assert view_crop(5, 0, hw, 1.0) is None and view_crop(5, 1, hw, 0.0) is None
    boxes = [view_crop(i, v, hw, 1.0) for i in range(30) for v in (1, 2, 3)]
    assert boxes == [view_crop(i, v, hw, 1.0) for i in range(30) for v in (1, 2, 3)]  # a pure function
    for top, left, h, w in boxes:
        assert CROP_SIDES[0] * 90 <= h <= 90 and CROP_SIDES[0] * 120 <= w <= 120
        assert 0 <= top <= 90 - h and 0 <= left <= 120 - w
    assert len(set(boxes)) == len(boxes)  # varied
    half = [view_crop(i, 1, hw, 0.5) for i in range(200)]
    assert 60 < sum(b is not None for b in half) < 140
    assert all(b is None or b == view_crop(i, 1, hw, 0.9) for i, b in enumerate(half))  # more p: the same + more
    for i in range(30):  # the flip and scale draws do not depend on the crop
        t = view_transform(i, 1, crop=1.0, hw=hw)
        assert (t.flip, t.scale, t.crop) == (view_transform(i, 1).flip, view_transform(i, 1).scale, boxes[3 * i])
    ids, frames = rows_frames([4, 9], [(90, 120), (50, 60)], 3, crop=1.0)
    assert ids.tolist() == [4, 4, 4, 9, 9, 9]
    assert frames[[0, 3]].tolist() == [[90, 120], [50, 60]]  # view 0: the image
    assert frames[1].tolist() == list(view_crop(4, 1, (90, 120), 1.0)[2:])
    assert np.array_equal(rows_frames([4, 9], [(90, 120), (50, 60)], 3)[1], np.repeat([[90, 120], [50, 60]], 3, 0))


def _cropped_by_hand(gt, box):
    """``gt`` cropped to ``box`` with numpy: masks sliced, empty ones left out, boxes from the pixels."""
    top, left, h, w = box
    keep = [g for g in range(len(gt.masks)) if gt.masks[g, top : top + h, left : left + w].any()]
    masks = gt.masks[keep, top : top + h, left : left + w]
    boxes = []
    for m in masks.numpy():
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return GroundTruth(
        masks=masks,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        category_ids=gt.category_ids[keep],
        iscrowd=gt.iscrowd[keep],
        ann_ids=gt.ann_ids[keep],
    )


def test_a_cropped_view_is_the_crop_of_the_image_and_its_ground_truth(caches, cropped, shapes_data):
    crop, one = Cache(cropped).split("val"), Cache(caches[0]).split("val")
    dataset = CocoDataset(shapes_data / "annotations" / "val.json", shapes_data / "val")
    preprocess = load_detector("demo", device=torch.device("cpu")).info.preprocess
    for j, image in enumerate(dataset.images):
        t = view_transform(image.id, 1, crop=1.0, hw=(image.height, image.width))
        top, left, h, w = t.crop
        sample = crop.read(2 * j + 1)
        assert tuple(sample.orig_hw.tolist()) == (h, w)  # the view's frame is the crop
        assert tuple(sample.input_hw.tolist()) == view_preprocess(preprocess, t).input_size(h, w)
        gt = _cropped_by_hand(dataset.ground_truth(image), t.crop)
        boxes = gt.boxes.clone()  # then mirrored in the crop's frame
        boxes[:, 0], boxes[:, 2] = w - gt.boxes[:, 2], w - gt.boxes[:, 0]
        gt.masks, gt.boxes = gt.masks.flip(-1), boxes
        gt_id, iou, masks = query_targets(sample.boxes, (int(sample.input_hw[0]), int(sample.input_hw[1])), gt, TARGET)
        assert torch.equal(sample.gt_id, gt_id) and torch.equal(sample.target_masks, masks)
        assert torch.allclose(sample.gt_iou, iou)
        a, b = one.read(j), crop.read(2 * j)  # view 0 is never cropped
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.target_masks, b.target_masks)
        assert torch.equal(b.orig_hw, torch.tensor([image.height, image.width]))
    assert (crop.index["orig_hw"][1::2] != crop.index["orig_hw"][0::2]).any()
    assert verify(cropped).ok
    assert stored_stats(crop.group) == stored_stats(one.group)  # match stats count each image once, at view 0


def test_cropped_views_are_the_same_on_every_run(cropped, shapes_data, tmp_path):
    run_extract(shapes_data, tmp_path / "again", 2, crop=1.0)
    a = zarr.open_group(str(cropped), mode="r")["val"]
    b = zarr.open_group(str(tmp_path / "again"), mode="r")["val"]
    for name in ("index/orig_hw", "index/input_hw", "boxes", "targets/gt_id", "targets/masks"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_no_crop_keeps_the_fingerprint_and_another_crop_is_another_cache(caches, cropped, shapes_data):
    fp = zarr.open_group(str(caches[1]), mode="r").attrs["mfcache"]
    assert "view_crop" not in fp["extract"]  # --view-crop 0: the fingerprint written before the option existed
    settings = ExtractSettings.from_fingerprint(fp)
    assert settings.view_crop == 0 and settings.options() == fp["extract"]
    assert zarr.open_group(str(cropped), mode="r").attrs["mfcache"]["extract"]["view_crop"] == 1.0
    with pytest.raises(MfcacheError, match=r"view_crop=0.0 .asked for 0.5"):
        run_extract(shapes_data, caches[1], 2, crop=0.5)
    with pytest.raises(MfcacheError, match=r"view_crop=1.0 .asked for 0.0"):
        run_extract(shapes_data, cropped, 2)
    run_extract(shapes_data, cropped, 2, crop=1.0)  # the same option: resumes (nothing left to write)


def test_view_crop_needs_views_and_a_probability(shapes_data, tmp_path):
    with pytest.raises(MfcacheError, match="`extract.view_crop` needs `extract.views` > 1"):
        run_extract(shapes_data, tmp_path / "c", 1, crop=0.5)
    with pytest.raises(MfcacheError, match="`extract.view_crop` must be in .0, 1"):
        check_config(config(2, 1.5))


def test_training_on_cropped_views_runs(cropped, tmp_path):
    from mfcache.config import resolve_run_config
    from mfcache.stages.train import train

    overrides = [
        "train.steps=4",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.device=cpu",
        "train.min_iou=0.1",
        "train.checkpoint_every=4",
        "train.eval_every=0",
    ]
    entry = train(
        cache_path=cropped,
        run_dir=tmp_path / "run",
        config=resolve_run_config(None, overrides),
        split="val",
        progress=False,
    )
    assert np.isfinite(entry["loss"]) and entry["step"] == 4
