"""Tests for the synthetic shapes dataset (mfcache.data.shapes): small and fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mfcache.data.shapes import (
    CATEGORIES,
    GENERATOR_VERSION,
    generate_image,
    mask_to_polygons,
    write_shapes_dataset,
)
from mfcache.errors import MfcacheError

SMALL = dict(num_train=6, num_val=3, min_size=64, max_size=128)


def _write(out: Path, **overrides) -> dict[str, Path]:
    return write_shapes_dataset(out, **{**SMALL, **overrides})


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _load(path: Path) -> COCO:
    return COCO(str(path))  # prints a few lines; pytest captures them


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return _write(tmp_path_factory.mktemp("shapes"), num_train=12)


def _masks(coco: COCO, image_id: int, *, crowd: bool) -> list[np.ndarray]:
    anns = coco.imgToAnns[image_id]
    return [coco.annToMask(a).astype(bool) for a in anns if bool(a["iscrowd"]) == crowd]


def test_returned_paths_and_layout(dataset):
    assert set(dataset) == {"train", "val", "train_images", "val_images"}
    for split in ("train", "val"):
        assert dataset[split].is_file() and dataset[split].name == f"{split}.json"
        assert dataset[split].parent.name == "annotations"
        assert dataset[f"{split}_images"].is_dir()
    assert not list(dataset["train"].parent.glob("*.tmp"))


def test_deterministic(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 6 + 3 + 2
    assert a == b


def test_rewrite_in_place_is_identical(tmp_path):
    _write(tmp_path)
    before = _files(tmp_path)
    _write(tmp_path)
    assert _files(tmp_path) == before


def test_seeds_and_splits_differ(tmp_path):
    a = _write(tmp_path / "a", seed=0)
    b = _write(tmp_path / "b", seed=1)
    assert a["train"].read_bytes() != b["train"].read_bytes()
    first_a = (a["train_images"] / "000001.png").read_bytes()
    assert first_a != (b["train_images"] / "000001.png").read_bytes()
    assert first_a != (a["val_images"] / "000001.png").read_bytes()


def test_adding_images_keeps_earlier_ones(tmp_path):
    small = _write(tmp_path / "small", num_train=3, num_val=1)
    big = _write(tmp_path / "big", num_train=6, num_val=3)
    for name in ("000001.png", "000002.png", "000003.png"):
        before, after = small["train_images"] / name, big["train_images"] / name
        assert before.read_bytes() == after.read_bytes()
    small_json = json.loads(small["train"].read_text())
    big_json = json.loads(big["train"].read_text())
    assert small_json["images"] == big_json["images"][:3]
    assert small_json["annotations"] == big_json["annotations"][: len(small_json["annotations"])]


def test_coco_structure(dataset):
    for split in ("train", "val"):
        data = json.loads(dataset[split].read_text())
        assert data["info"]["description"] == "mfcache synthetic shapes"
        assert data["info"]["generator_version"] == GENERATOR_VERSION
        assert data["info"]["seed"] == 0
        assert data["categories"] == [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)
        ]
        assert len(CATEGORIES) == 6
        assert [im["id"] for im in data["images"]] == list(range(1, len(data["images"]) + 1))
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for ann in data["annotations"]:
            assert ann["category_id"] in range(1, 7)
            assert ann["iscrowd"] in (0, 1)
            assert all(isinstance(v, float) for v in ann["bbox"])
            if ann["iscrowd"]:
                assert isinstance(ann["segmentation"], dict)


def test_images_match_json(dataset):
    data = json.loads(dataset["train"].read_text())
    for im in data["images"]:
        with Image.open(dataset["train_images"] / im["file_name"]) as png:
            assert png.format == "PNG" and png.mode == "RGB"
            assert png.size == (im["width"], im["height"])
    sizes = {(im["width"], im["height"]) for im in data["images"]}
    assert len(sizes) > 1
    assert any(w != h for w, h in sizes)
    assert all(64 <= s <= 128 for size in sizes for s in size)


def test_annotations_decode_to_their_masks(dataset):
    kinds = set()
    for split in ("train", "val"):
        coco = _load(dataset[split])
        for ann in coco.dataset["annotations"]:
            image = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == (image["height"], image["width"])
            assert mask.any()
            assert ann["area"] == mask.sum()  # polygons are exact, not just close
            rows, cols = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y) == (cols.min(), rows.min())
            assert (w, h) == (cols.max() - x + 1, rows.max() - y + 1)
            kinds.add(type(ann["segmentation"]).__name__)
    assert kinds == {"list", "dict"}


def test_masks_matter(dataset):
    coco = _load(dataset["train"])
    anns = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
    fills = [a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in anns]
    assert len(fills) >= 10
    assert np.mean(fills) < 0.75


def test_instances_do_not_overlap(dataset):
    coco = _load(dataset["train"])
    for image_id in coco.imgs:
        masks = _masks(coco, image_id, crowd=False) + _masks(coco, image_id, crowd=True)
        if masks:
            assert np.sum(masks, axis=0).max() <= 1


def test_some_images_have_crowds(tmp_path):
    paths = write_shapes_dataset(tmp_path, num_train=40, num_val=0, min_size=48, max_size=64)
    anns = json.loads(paths["train"].read_text())["annotations"]
    crowds = [a for a in anns if a["iscrowd"]]
    assert 1 <= len(crowds) <= 4
    assert len({a["image_id"] for a in crowds}) == len(crowds)  # at most one per image


def test_progress_counts_images(tmp_path):
    seen: list[int] = []
    _write(tmp_path, num_train=2, num_val=1, progress=seen.append)
    assert sum(seen) == 3


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_train=-1),
        dict(seed=-1),
        dict(min_size=200, max_size=100),
        dict(min_size=8, max_size=16),
    ],
)
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(MfcacheError):
        _write(tmp_path, **bad)


def test_generate_image_contract():
    image, instances = generate_image(np.random.default_rng(3), 100, 70, crowd=True)
    assert image.shape == (70, 100, 3) and image.dtype == np.uint8
    assert 1 <= len(instances) <= 6
    for inst in instances:
        assert inst.mask.shape == (70, 100) and inst.mask.dtype == bool
        assert inst.mask.sum() >= 30
        assert 1 <= inst.category_id <= len(CATEGORIES)


def test_polygons_round_trip_and_holes_need_rle():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random((7, 9)) < 0.6
        polygons = mask_to_polygons(mask, tolerance=0.0)
        if polygons is None:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, 7, 9))
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False
    assert mask_to_polygons(ring) is None
    checker = np.indices((4, 4)).sum(axis=0) % 2 == 0  # only diagonal contacts
    assert mask_to_polygons(checker) is not None
