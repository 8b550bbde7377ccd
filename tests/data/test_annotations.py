"""Imperfect annotation files: every field is checked when the file is loaded, before
anything is written; what can be derived is derived, the rest is one error line (or, with
--skip-bad, a recorded skip); the cache stores the cleaned file, so eval scores what extract
accepted; and no input makes mask rasterisation allocate beyond the image's size."""

import json
import math
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mfcache.cache.reader import Cache
from mfcache.cache.verify import verify
from mfcache.data.coco import CocoDataset
from mfcache.data.segmentation import OUTLINE_FLOOR, outline_length, segmentation_rle
from mfcache.data.shapes import write_shapes_dataset
from tests.helpers.cli import extract_demo, invoke, one_error_line

# Address space for a whole `extract` subprocess: a normal run of the tiny dataset peaks at
# ~4.5 GiB of virtual memory (torch maps much it never touches); the NaN polygon used to
# make pycocotools allocate 24 GB.
EXTRACT_ADDRESS_SPACE = 8 << 30


@pytest.fixture
def data(tmp_path):
    write_shapes_dataset(tmp_path / "d", num_train=4, num_val=0, seed=4, min_size=64, max_size=80)
    return tmp_path / "d"


def source(data) -> dict:
    return json.loads((data / "annotations" / "train.json").read_text())


def edited(data, change, name="edited.json"):
    """The shapes annotation file after ``change(ann_dict)``, written next to it."""
    ann = source(data)
    change(ann)
    path = data / "annotations" / name
    path.write_text(json.dumps(ann))  # NaN and Infinity are written as JSON's NaN / Infinity tokens
    return path


def polygon_annotation(ann: dict) -> dict:
    return next(a for a in ann["annotations"] if isinstance(a["segmentation"], list))


def rle_annotation(ann: dict) -> dict:
    return next(a for a in ann["annotations"] if isinstance(a["segmentation"], dict))


def stored_annotations(out, split="edited") -> dict:
    return Cache(out).split(split).coco().dataset


# -- errors: one line naming the annotation id and the field, nothing written -----------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e9], ids=["nan", "inf", "-inf", "far"])
def test_bad_polygon_coordinate_is_one_line_before_anything_is_written(data, tmp_path, value):
    def change(ann):
        polygon_annotation(ann)["segmentation"][0][3] = value

    ann_id = polygon_annotation(source(data))["id"]
    result = extract_demo(data, tmp_path / "cache", annotations=edited(data, change))
    one_error_line(result, f"annotation id {ann_id}", "segmentation", "--skip-bad")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("bbox", ["10,10,5,5", [1, 2, 3], [1, 2, math.nan, 3], [1, 2, -3, 4], None, [True, 1, 2, 3]])
def test_ill_typed_bbox_is_an_error(data, tmp_path, bbox):
    def change(ann):
        ann["annotations"][1]["bbox"] = bbox

    ann_id = source(data)["annotations"][1]["id"]
    one_error_line(
        extract_demo(data, tmp_path / "cache", annotations=edited(data, change)), f"annotation id {ann_id}", "bbox"
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("area", ["12", math.nan, -1.0, None])
def test_ill_typed_area_is_an_error(data, tmp_path, area):
    def change(ann):
        ann["annotations"][2]["area"] = area

    ann_id = source(data)["annotations"][2]["id"]
    one_error_line(
        extract_demo(data, tmp_path / "cache", annotations=edited(data, change)), f"annotation id {ann_id}", "area"
    )


@pytest.mark.parametrize("segmentation", ["absent", [], "abc", [["1", "2", "3", "4", "5", "6"]], [[1, 2, 3, 4, 5]]])
def test_missing_or_ill_typed_segmentation_is_an_error(data, tmp_path, segmentation):
    def change(ann):
        if segmentation == "absent":
            del ann["annotations"][0]["segmentation"]
        else:
            ann["annotations"][0]["segmentation"] = segmentation

    ann_id = source(data)["annotations"][0]["id"]
    result = extract_demo(data, tmp_path / "cache", annotations=edited(data, change))
    one_error_line(result, f"annotation id {ann_id}", "segmentation")
    if segmentation in ("absent", []):
        assert "cannot be derived" in " ".join(result.output.split())


@pytest.mark.parametrize("kind", ["compressed", "uncompressed"])
def test_rle_of_another_size_is_an_error(data, tmp_path, kind):
    def change(ann):
        target = rle_annotation(ann)
        h, w = target["segmentation"]["size"]
        if kind == "uncompressed":
            mask = mask_utils.decode(target["segmentation"])
            flat = np.asfortranarray(mask).ravel(order="F")
            runs = np.diff(np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]])), prepend=0).tolist()
            target["segmentation"] = {"size": [h, w], "counts": runs}
            assert sum(runs) == h * w
        target["segmentation"]["size"] = [h + 1, w]

    ann_id = rle_annotation(source(data))["id"]
    one_error_line(
        extract_demo(data, tmp_path / "cache", annotations=edited(data, change)),
        f"annotation id {ann_id}",
        "segmentation",
        "RLE size",
    )


def test_rle_whose_runs_do_not_cover_the_image_is_an_error(data, tmp_path):
    def change(ann):
        target = rle_annotation(ann)
        target["segmentation"] = {"size": target["segmentation"]["size"], "counts": [5, 10, 99999]}

    one_error_line(
        extract_demo(data, tmp_path / "cache", annotations=edited(data, change)), "RLE counts cover 100014 pixels"
    )


def test_iscrowd_other_than_0_or_1_is_an_error(data, tmp_path):
    def change(ann):
        ann["annotations"][0]["iscrowd"] = 2

    one_error_line(extract_demo(data, tmp_path / "cache", annotations=edited(data, change)), "iscrowd", "0 or 1")


# -- --skip-bad: recorded, counted, left out of the stored file -------------------------------


def test_skip_bad_records_bad_annotations_and_stores_the_cleaned_file(data, tmp_path):
    ann = source(data)
    bad = [ann["annotations"][0]["id"], polygon_annotation(ann)["id"]]

    def change(a):
        del a["annotations"][0]["segmentation"]
        next(x for x in a["annotations"] if isinstance(x.get("segmentation"), list))["segmentation"][0][0] = math.nan

    out = tmp_path / "cache"
    result = extract_demo(data, out, "--skip-bad", annotations=edited(data, change))
    assert result.exit_code == 0, result.output
    assert "skipped 2 bad annotations" in " ".join(result.output.split())
    split = Cache(out).split("edited")
    assert sorted(split.skipped_annotations) == sorted(bad)
    assert "segmentation is missing" in split.skipped_annotations[bad[0]]
    assert "not a finite number" in split.skipped_annotations[bad[1]]
    stored = stored_annotations(out)
    assert {a["id"] for a in stored["annotations"]} == {a["id"] for a in ann["annotations"]} - set(bad)
    assert verify(out).ok
    shown = " ".join(invoke("inspect", out).output.split())
    assert f"skipped annotation id {bad[0]}: segmentation is missing" in shown


def test_degenerate_polygons_are_dropped_and_said(data, tmp_path):
    def change(ann):
        b, a = polygon_annotation(ann), ann["annotations"][0]
        a["segmentation"] = [[3, 3, 9, 3]]  # two points: pycocotools would draw it as a box
        b["segmentation"] = b["segmentation"] + [[1, 1, 2, 2, 3, 3]]  # collinear: no area

    ann = source(data)
    empty, extended = ann["annotations"][0]["id"], polygon_annotation(ann)["id"]
    out = tmp_path / "cache"
    result = extract_demo(data, out, annotations=edited(data, change))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dropped 1 polygon part" in text and "left out 1 annotation whose polygons mark no pixel" in text
    stored = {a["id"]: a for a in stored_annotations(out)["annotations"]}
    assert empty not in stored and stored[extended]["segmentation"] == polygon_annotation(ann)["segmentation"]
    assert list(Cache(out).split("edited").skipped_annotations) == [empty]


# -- derived fields -----------------------------------------------------------------------------


def test_missing_bbox_area_iscrowd_are_derived_from_the_mask(data, tmp_path):
    def change(ann):
        for a in ann["annotations"]:
            del a["bbox"], a["area"], a["iscrowd"]

    out = tmp_path / "cache"
    result = extract_demo(data, out, annotations=edited(data, change))
    assert result.exit_code == 0, result.output
    n = len(source(data)["annotations"])
    text = " ".join(result.output.split())
    assert f"derived area for {n} annotations, bbox for {n}, iscrowd for {n}" in text
    images = {im["id"]: im for im in source(data)["images"]}
    for a in stored_annotations(out)["annotations"]:
        h, w = images[a["image_id"]]["height"], images[a["image_id"]]["width"]
        rle = segmentation_rle(a["segmentation"], h, w)
        assert a["area"] == float(mask_utils.area(rle)) > 0
        assert a["bbox"] == mask_utils.toBbox(rle).tolist() and a["iscrowd"] == 0
    assert verify(out).ok


def test_a_clean_file_is_stored_as_it_is(data):
    path = data / "annotations" / "train.json"
    dataset = CocoDataset(path, data / "train")
    assert dataset.stored == path.read_bytes() and dataset.report.summary() == ""


def test_extract_train_eval_on_a_file_with_derived_fields(data, tmp_path):
    def change(ann):
        for i, a in enumerate(ann["annotations"]):
            del a[("bbox", "area", "iscrowd", "segmentation")[i % 4] if i < 4 else ("bbox", "area")[i % 2]]

    skipped = source(data)["annotations"][3]["id"]  # no segmentation
    path = edited(data, change)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    for split in ("train", "val"):  # the same images twice: eval needs a split of its own
        result = extract_demo(data, cache, "--split", split, "--skip-bad", annotations=path)
        assert result.exit_code == 0 and "derived area" in result.output, result.output
    result = invoke(
        "train",
        "--cache",
        cache,
        "--split",
        "train",
        "--out",
        run_dir,
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "-q",
    )
    assert result.exit_code == 0, result.output
    result = invoke(
        "eval", "--cache", cache, "--run", run_dir, "--split", "val", "--out", tmp_path / "metrics.json", "-q"
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["bbox"]["AP"] is not None and metrics["segm"]["AP"] is not None
    assert metrics["skipped_annotations"] == [skipped]


# -- file_name containment ----------------------------------------------------------------------


def test_file_name_outside_images_is_refused(data, tmp_path):
    first = sorted(source(data)["images"], key=lambda im: im["id"])[0]
    outside = data / first["file_name"]  # a readable image one level above --images
    outside.write_bytes((data / "train" / first["file_name"]).read_bytes())

    def renamed(name):
        def change(ann):
            next(im for im in ann["images"] if im["id"] == first["id"])["file_name"] = name

        return edited(data, change)

    for name in (f"../{first['file_name']}", str(outside), f"sub/../../{first['file_name']}"):
        one_error_line(
            extract_demo(data, tmp_path / "cache", annotations=renamed(name)),
            f"image id {first['id']}",
            "file_name",
            "the image folder",
            "--skip-bad",
        )
        assert not (tmp_path / "cache").exists()
    result = extract_demo(data, tmp_path / "cache", "--skip-bad", annotations=renamed(f"../{first['file_name']}"))
    assert result.exit_code == 0, result.output
    skipped = Cache(tmp_path / "cache").split("edited").skipped
    assert list(skipped) == [first["id"]] and "outside the image folder" in skipped[first["id"]]


def test_file_name_inside_images_may_use_subfolders(data, tmp_path):
    (data / "train" / "sub").mkdir()
    first = sorted(source(data)["images"], key=lambda im: im["id"])[0]
    (data / "train" / first["file_name"]).rename(data / "train" / "sub" / first["file_name"])

    def change(ann):
        next(im for im in ann["images"] if im["id"] == first["id"])["file_name"] = f"sub/./x/../{first['file_name']}"

    (data / "train" / "sub" / "x").mkdir()
    out = tmp_path / "cache"
    assert extract_demo(data, out, annotations=edited(data, change)).exit_code == 0
    # the image was read from the subfolder: cached with its instances, as the file names it
    stored = stored_annotations(out)
    image = next(im for im in stored["images"] if im["id"] == first["id"])
    assert image["file_name"] == f"sub/./x/../{first['file_name']}"
    index = Cache(out).split("edited").index
    row = index["image_id"].tolist().index(first["id"])
    assert index["orig_hw"][row].tolist() == [first["height"], first["width"]]
    assert len(stored["images"]) == len(source(data)["images"])
    assert [a["id"] for a in stored["annotations"] if a["image_id"] == first["id"]] == [
        a["id"] for a in source(data)["annotations"] if a["image_id"] == first["id"]
    ]


# -- bounded rasterisation ----------------------------------------------------------------------


def _limited_extract(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m mfcache extract ARGS`` with its address space capped at EXTRACT_ADDRESS_SPACE."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (EXTRACT_ADDRESS_SPACE, EXTRACT_ADDRESS_SPACE))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    return subprocess.run(
        [sys.executable, "-m", "mfcache", "extract", *args],
        preexec_fn=cap,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_nan_polygon_extract_stays_within_a_memory_cap(data, tmp_path):
    """The whole extraction (load, rasterise every other annotation, write) under the cap;
    without --skip-bad the same file is refused at load (test above)."""

    def change(ann):
        polygon_annotation(ann)["segmentation"][0][1] = math.nan

    done = _limited_extract(
        [
            "--detector",
            "demo",
            "--images",
            str(data / "train"),
            "--annotations",
            str(edited(data, change)),
            "--out",
            str(tmp_path / "cache"),
            "--skip-bad",
            "--workers",
            "0",
            "--topk",
            "10",
            "--target-size",
            "8",
            "--device",
            "cpu",
            "-q",
        ]
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and "skipped 1 bad annotation" in output, (done.returncode, output[-2000:])


@pytest.mark.parametrize("polygon", [[0, 0, math.nan, 5, 10, 10], [0, 0, 1e12, 0, 1e12, 1e12]])
def test_rasterisation_refuses_unbounded_polygons(polygon):
    with pytest.raises(ValueError, match="finite|outside"):
        segmentation_rle([polygon], 20, 30)


def test_rasterisation_refuses_an_outline_longer_than_the_image_has_pixels():
    zigzag = [v for i in range(200) for v in (0 if i % 2 else 29, i % 20)]  # 200 edges across a 30 px wide image
    with pytest.raises(ValueError, match="outline"):
        segmentation_rle([zigzag], 20, 30)


def test_rasterisation_refuses_rle_runs_past_the_image():
    with pytest.raises(ValueError, match="cover"):
        segmentation_rle({"size": [4, 5], "counts": [3, 400]}, 4, 5)  # pycocotools would write past the mask
    with pytest.raises(ValueError, match="cover"):
        segmentation_rle(
            {"size": [4, 5], "counts": mask_utils.encode(np.ones((5, 5), np.uint8, order="F"))["counts"]}, 4, 5
        )


def test_rasterisation_equals_pycocotools_within_the_bounds():
    """Bounded, never reshaped: the same masks as pycocotools (hence as COCO's own evaluation)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(3, 50, 2))
        parts = [
            np.stack([rng.uniform(-w, 2 * w, k), rng.uniform(-h, 2 * h, k)], 1).ravel().tolist()
            for k in rng.integers(3, 9, rng.integers(1, 3))
        ]
        if outline_length([np.reshape(p, (-1, 2)) for p in parts]) > max(h * w, OUTLINE_FLOOR):
            continue
        expected = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
        assert segmentation_rle(parts, h, w)["counts"] == expected["counts"]
        rle = mask_utils.encode(np.asfortranarray(mask_utils.decode(expected)))
        assert np.array_equal(
            mask_utils.decode(segmentation_rle({"size": [h, w], "counts": rle["counts"].decode()}, h, w)),
            mask_utils.decode(expected),
        )
