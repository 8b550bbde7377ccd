"""Bad inputs end in one clear line and lose nothing already cached; odd but valid inputs
are handled, not refused."""

import errno
import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from mfcache.cache import writer as writer_module
from mfcache.cache.reader import Cache
from mfcache.cache.verify import verify
from mfcache.cache.writer import open_root
from mfcache.config import ExtractConfig
from mfcache.data.shapes import CATEGORIES, write_shapes_dataset
from mfcache.data.transforms import load_image
from mfcache.errors import MfcacheError
from mfcache.metrics import coco_evaluate
from mfcache.stages.extract import extract
from tests.helpers.cli import extract_demo, invoke, one_error_line

CONFIG = ExtractConfig(
    topk=10, target_size=8, block_size=2, num_workers=0, device="cpu", c1="store"
)  # the disk-full test counts the writes of memory and c1


@pytest.fixture
def data(tmp_path):
    write_shapes_dataset(tmp_path / "d", num_train=6, num_val=0, seed=4, min_size=64, max_size=80)
    return tmp_path / "d"


@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("--c1", "stored", "auto, store, recompute, none"),
        ("--dtype", "int4", "float16, float32, int8"),
        ("--resize", "fast", "auto, processor, float"),
        ("--levels", "-1", ">= 0"),
    ],
)
def test_a_bad_option_value_is_one_line_naming_the_option(data, tmp_path, option, value, allowed):
    result = extract_demo(data, tmp_path / "cache", option, value)
    one_error_line(result, f"{option} must", allowed, repr(value) if option != "--levels" else "(-1,)")
    assert not (tmp_path / "cache").exists()  # refused before anything is made


def image_file(data, position):
    images = sorted(json.loads((data / "annotations" / "train.json").read_text())["images"], key=lambda im: im["id"])
    return data / "train" / images[position]["file_name"], images[position]["id"]


def done(out):
    return zarr.open_array(out / "train" / "index" / "done", mode="r")[:]


def test_missing_image_keeps_finished_blocks_and_skip_bad_records_it(data, tmp_path):
    path, image_id = image_file(data, 3)
    saved = path.read_bytes()
    path.unlink()
    out = tmp_path / "cache"
    one_error_line(extract_demo(data, out), "image file not found", path.name, "--skip-bad")
    assert done(out).tolist() == [1, 1, 0, 0, 0, 0]  # the first block survived the error
    assert extract_demo(data, out, "--skip-bad").exit_code == 0
    assert done(out).tolist() == [1, 1, 1, 2, 1, 1]
    split = Cache(out).split()
    assert list(split.skipped) == [image_id] and "not found" in split.skipped[image_id]
    split.require_complete()  # skipped counts as finished
    assert 3 not in split.complete_rows.tolist() and verify(out).ok
    shown = " ".join(invoke("inspect", out).output.split())
    assert f"skipped image id {image_id}: image file not found" in shown
    path.write_bytes(saved)  # fixed: a run without --skip-bad tries it again
    assert extract_demo(data, out).exit_code == 0
    assert done(out).tolist() == [1] * 6 and Cache(out).split().skipped == {} and verify(out).ok


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_image(data, tmp_path, damage):
    path, _ = image_file(data, 0)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else b"not an image at all" * 10)
    one_error_line(extract_demo(data, tmp_path / "cache"), "cannot decode image", path.name)


def edit_annotations(data, change):
    ann = json.loads((data / "annotations" / "train.json").read_text())
    change(ann)
    path = data / "annotations" / "edited.json"
    path.write_text(json.dumps(ann))
    return path


def test_bad_annotation_files(data, tmp_path):
    bad = data / "annotations" / "bad.json"
    bad.write_text('{"images": [')
    one_error_line(extract_demo(data, tmp_path / "c", annotations=bad), "malformed annotation JSON", "bad.json")
    path = edit_annotations(data, lambda a: a["annotations"][0].update(image_id=987654))
    one_error_line(extract_demo(data, tmp_path / "c", annotations=path), "unknown image id 987654")
    path = edit_annotations(data, lambda a: a["annotations"][0].update(category_id=4321))
    one_error_line(extract_demo(data, tmp_path / "c", annotations=path), "unknown category id 4321")


def test_cache_of_another_detector_or_annotation_file(data, tmp_path):
    out = tmp_path / "cache"
    assert extract_demo(data, out).exit_code == 0
    before = done(out).copy()
    fp = dict(zarr.open_group(out, mode="r").attrs["mfcache"])
    fp["detector"] = {**fp["detector"], "weights_sha256": "0" * 64}
    with pytest.raises(MfcacheError, match="another detector"):
        open_root(out, fp)
    other = edit_annotations(data, lambda a: a["annotations"].pop())
    renamed = other.with_name("train.json")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    shutil.move(other, other_dir / renamed.name)
    one_error_line(extract_demo(data, out, annotations=other_dir / "train.json"), "another annotation file")
    np.testing.assert_array_equal(done(out), before)
    assert verify(out).ok


def test_disk_full_mid_run(data, tmp_path, monkeypatch):
    calls = []
    original = writer_module.BlockWriter._write_ragged

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # memory and c1 of the first block, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(writer_module.BlockWriter, "_write_ragged", full_disk)
    out = tmp_path / "cache"
    with pytest.raises(MfcacheError, match="disk full while writing images 2..3"):
        extract(
            detector="demo",
            images=data / "train",
            annotations=data / "annotations" / "train.json",
            out=out,
            config=CONFIG,
            progress=False,
        )
    assert done(out).tolist() == [1, 1, 0, 0, 0, 0] and verify(out).ok
    monkeypatch.setattr(writer_module.BlockWriter, "_write_ragged", original)
    summary = extract(
        detector="demo",
        images=data / "train",
        annotations=data / "annotations" / "train.json",
        out=out,
        config=CONFIG,
        progress=False,
    )
    assert summary.written == 4 and done(out).tolist() == [1] * 6


def test_odd_but_valid_images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 56), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=100)

    gray = load_image(tmp_path / "gray.png")
    assert (
        gray.shape == (3, 40, 56)
        and torch.equal(gray[0], gray[2])
        and torch.equal(gray[0], torch.from_numpy(rgb[..., 0]))
    )
    assert torch.equal(load_image(tmp_path / "rgba.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(load_image(tmp_path / "deep.png")[0], torch.from_numpy(rgb[..., 0]))
    rotated = load_image(tmp_path / "rotated.jpg")
    assert rotated.shape == (3, 56, 40)  # displayed orientation, as COCO's width/height say
    stored = np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB"))  # as stored, not as displayed
    assert torch.equal(rotated, torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1))


def test_odd_but_valid_dataset_extracts(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    files = {"gray.png": "L", "rgba.png": "RGBA", "deep.png": "I;16", "plain.png": "RGB"}
    images = []
    for n, (name, mode) in enumerate(files.items()):
        arr = rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)
        if mode == "L":
            img = Image.fromarray(arr[..., 0])
        elif mode == "RGBA":
            img = Image.fromarray(np.dstack([arr, arr[..., :1]]))
        elif mode == "I;16":
            img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
        else:
            img = Image.fromarray(arr)
        img.save(tmp_path / "img" / name)
        images.append({"id": 1000 + 7 * n, "file_name": name, "height": 64, "width": 72})  # non-contiguous ids
    square = [10, 10, 40, 10, 40, 40, 10, 40]
    anns = [
        {
            "id": 5,
            "image_id": 1000,
            "category_id": 30,
            "segmentation": [square],
            "area": 900,
            "bbox": [10, 10, 30, 30],
            "iscrowd": 0,
        },
        {
            "id": 9,
            "image_id": 1000,
            "category_id": 12,
            "segmentation": [[20, 20, 30, 30]],
            "area": 0,
            "bbox": [20, 20, 10, 10],
            "iscrowd": 0,
        },
        {
            "id": 11,
            "image_id": 1007,
            "category_id": 12,
            "segmentation": [[5, 5, 5, 5, 5, 5]],
            "area": 0,
            "bbox": [5, 5, 0, 0],
            "iscrowd": 0,
        },
        {
            "id": 13,
            "image_id": 1007,
            "category_id": 30,
            "segmentation": {"size": [64, 72], "counts": [100, 500, 4008]},
            "area": 500,
            "bbox": [1, 28, 8, 36],
            "iscrowd": 1,
        },
        {
            "id": 17,
            "image_id": 1014,
            "category_id": 12,
            "segmentation": [square],
            "area": 900,
            "bbox": [10, 10, 30, 30],
            "iscrowd": 0,
        },
    ]  # image 1021 has no annotations
    categories = [{"id": 12, "name": CATEGORIES[0]}, {"id": 30, "name": CATEGORIES[1]}]  # the demo's names
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    extract(
        detector="demo",
        images=tmp_path / "img",
        annotations=tmp_path / "a.json",
        out=tmp_path / "cache",
        config=CONFIG,
        progress=False,
    )
    split = Cache(tmp_path / "cache").split()
    assert len(split.complete_rows) == 4 and verify(tmp_path / "cache").ok
    gt_ids = set(zarr.open_array(tmp_path / "cache" / "a" / "targets" / "gt_id", mode="r")[:].ravel().tolist())
    assert gt_ids <= {-1, 5, 17}  # crowd and degenerate polygons are never targets


def test_eval_scores_only_evaluated_images():
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "height": 20, "width": 20}, {"id": 2, "height": 20, "width": 20}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "bbox": [2, 2, 10, 10],
                "area": 100,
                "iscrowd": 0,
                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
            }
            for i in (1, 2)
        ],
    }
    coco.createIndex()
    result = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}]
    assert coco_evaluate(coco, result, iou_types=("bbox",))["bbox"]["AP"] < 0.9
    assert coco_evaluate(coco, result, iou_types=("bbox",), image_ids=[1])["bbox"]["AP"] == pytest.approx(1.0)


def test_labels_matching_no_category_leave_no_cache_behind(shapes_data, tmp_path):
    import json

    from mfcache.stages.extract import extract as run_extract

    data = json.loads((shapes_data / "annotations" / "val.json").read_text())
    for category in data["categories"]:
        category["name"] = "not-a-shape-" + category["name"]
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    with pytest.raises(MfcacheError, match="none of the detector's labels"):
        run_extract(
            detector="demo", images=shapes_data / "val", annotations=renamed, out=tmp_path / "cache", progress=False
        )
    assert not (tmp_path / "cache").exists()
