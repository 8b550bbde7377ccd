"""``extract --views N``: view 0 is the plain cache row for row, views 1.. carry the flipped /
rescaled image's own detector pass and targets, training draws one view per image per epoch,
eval scores each image once, and another N is another cache."""

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.reader import Cache, CacheDataset
from mfcache.cache.targets import query_targets
from mfcache.cache.verify import verify
from mfcache.config import ExtractConfig
from mfcache.data.coco import CocoDataset
from mfcache.data.views import SCALES, view_preprocess, view_transform
from mfcache.detectors import load_detector
from mfcache.errors import MfcacheError
from mfcache.stages.extract import extract
from mfcache.stages.sampling import StepBatches, ViewStepBatches, step_batches

TARGET = 16


def config(views: int) -> ExtractConfig:
    return ExtractConfig(topk=10, target_size=TARGET, block_size=4, num_workers=0, device="cpu", c1="store",
                         views=views)


def run_extract(data, out, views):
    return extract(detector="demo", images=data / "val", annotations=data / "annotations" / "val.json",
                   out=out, config=config(views), progress=False)


@pytest.fixture(scope="module")
def caches(shapes_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    run_extract(shapes_data, root / "one", 1)
    run_extract(shapes_data, root / "two", 2)
    return root / "one", root / "two"


def test_view_transforms_are_deterministic_and_varied():
    assert view_transform(7, 0).identity
    for image_id in range(20):
        assert view_transform(image_id, 1) == view_transform(image_id, 1)  # a pure function
        assert view_transform(image_id, 1).flip and not view_transform(image_id, 2).flip
        assert view_transform(image_id, 2).scale in SCALES and view_transform(image_id, 2).scale != 1.0
    assert len({view_transform(i, 1).scale for i in range(20)}) > 1  # scales differ between images


def test_rows_are_images_times_views_and_view0_is_the_plain_cache(caches):
    one, two = Cache(caches[0]).split("val"), Cache(caches[1]).split("val")
    n = one.num_images
    assert two.num_images == 2 * n
    np.testing.assert_array_equal(two.index["image_id"], np.repeat(one.index["image_id"], 2))
    np.testing.assert_array_equal(two.done, np.arange(0, 2 * n, 2))  # eval/validation: each image once
    np.testing.assert_array_equal(two.index["input_hw"][0::2], one.index["input_hw"])
    for i in range(n):
        a, b = one.read(i), two.read(2 * i)
        for name in ("queries", "boxes", "scores", "labels", "gt_id", "gt_iou", "target_masks", "c1"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(x, y) for x, y in zip(a.levels, b.levels))
    assert verify(caches[1]).ok


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
        keys = [k for b in batches[epoch * 4: epoch * 4 + 4] for k in b]
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

    overrides = ["train.steps=2", "train.batch_size=2", "train.num_workers=0", "train.device=cpu",
                 "train.min_iou=0.1", "train.checkpoint_every=2", "train.eval_every=0"]
    cfg = resolve_run_config(None, overrides)
    entry = train(cache_path=caches[1], run_dir=tmp_path / "run", config=cfg, split="val", progress=False)
    assert np.isfinite(entry["loss"])
    from mfcache.heads import build_head

    cache = Cache(caches[1])
    data = cache.split("val")
    info = cache.detector
    head = build_head(cfg.head, d_model=info.d_model, c1_channels=info.c1_channels,
                      num_levels=len(info.strides)).eval()
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
    with pytest.raises(MfcacheError, match="--views > 1 needs --c1"):
        extract(detector="demo", images=shapes_data / "train",
                annotations=shapes_data / "annotations" / "train.json", out=tmp_path / "c", config=cfg,
                progress=False)
