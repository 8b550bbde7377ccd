"""Your own dataset's labels: `extract --label-map FILE` (detector label -> dataset category) and
`--class-agnostic`, recorded in the fingerprint, warned about, shown by `inspect`, carried
through train, eval and predict. The data: the shapes val split with every category renamed
and renumbered, so no detector label names a category."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch
import zarr
from pycocotools.coco import COCO

from mfcache.cache.reader import Cache
from mfcache.config import ExtractConfig
from mfcache.data.labels import AGNOSTIC_CATEGORY, resolve_labels
from mfcache.data.shapes import CATEGORIES
from mfcache.errors import MfcacheError
from mfcache.metrics import coco_evaluate
from mfcache.stages.evaluate import evaluate, predict_split, score
from mfcache.stages.extract import extract
from mfcache.stages.postprocess import kept_queries
from mfcache.stages.runs import load_run
from tests.helpers.cli import invoke, one_error_line, run_ok

EXTRACT = ExtractConfig(topk=40, target_size=16, block_size=4, num_workers=0, device="cpu")
TRAIN = [
    "--set",
    "train.steps=2",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.num_workers=0",
    "--set",
    "train.device=cpu",
    "-q",
]
# shapes category -> (new id, new name): every name and id differs from the detector's labels
RENAMED = {
    "ring": (16, "donut"),
    "star": (12, "asterisk"),
    "crescent": (13, "moon"),
    "ell": (14, "L"),
    "cross": (15, "plus"),
    "triangle": (11, "wedge"),
}
# by name or by id, as a user would mix them
FULL_MAP = {"ring": "donut", "star": 12, "crescent": "moon", "ell": "L", "cross": "plus", "triangle": 11}
PARTIAL_MAP = {"ring": "donut", "star": 12, "crescent": "moon", "ell": "L"}  # wedge and plus unreachable


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def data(shapes_data, tmp_path_factory):
    """``{"root", "images", "original", "renamed", "id_map"}``: the val split as generated and
    with its categories renamed (``id_map``: original id -> renamed id)."""
    root = tmp_path_factory.mktemp("labels")
    original = json.loads((shapes_data / "annotations" / "val.json").read_text())
    id_map = {i + 1: RENAMED[name][0] for i, name in enumerate(CATEGORIES)}
    renamed = copy.deepcopy(original)
    renamed["categories"] = [
        {"id": RENAMED[c["name"]][0], "name": RENAMED[c["name"]][1]} for c in original["categories"]
    ]
    for ann in renamed["annotations"]:
        ann["category_id"] = id_map[ann["category_id"]]
    (root / "renamed").mkdir()
    return {
        "root": root,
        "images": shapes_data / "val",
        "original": shapes_data / "annotations" / "val.json",
        "renamed": write_json(root / "renamed" / "val.json", renamed),
        "id_map": id_map,
    }


def extract_to(data, out, *, label_map=None, class_agnostic=False, annotations="renamed"):
    config = ExtractConfig(
        **{
            **EXTRACT.__dict__,
            "class_agnostic": class_agnostic,
            "label_map": str(write_json(data["root"] / f"{out}.json", label_map)) if label_map else "",
        }
    )
    extract(
        detector="demo",
        images=data["images"],
        annotations=data[annotations],
        out=data["root"] / out,
        config=config,
        progress=False,
    )
    return data["root"] / out


@pytest.fixture(scope="module")
def caches(data):
    """Caches of the same images: by name (original names), a full map and class-agnostic (renamed);
    a head trained 2 steps on each of the last two."""
    out = {
        "name": extract_to(data, "by_name", annotations="original"),
        "map": extract_to(data, "full_map", label_map=FULL_MAP),
        "agnostic": extract_to(data, "agnostic", class_agnostic=True),
    }
    for kind in ("map", "agnostic"):
        run_ok("train", "--cache", out[kind], "--out", data["root"] / f"run_{kind}", *TRAIN)
    return out


def split_arrays(cache, *names):
    group = zarr.open_group(cache / "val", mode="r")
    return {name: group[name][:] for name in names}


def test_renamed_categories_without_a_map_are_refused_with_the_fix(data):
    result = invoke(
        "extract",
        "--detector",
        "demo",
        "--images",
        data["images"],
        "--annotations",
        data["renamed"],
        "--out",
        data["root"] / "refused",
        "--workers",
        0,
        "-q",
    )
    one_error_line(result, "none of the detector's labels", "donut", "--label-map FILE", "--class-agnostic")
    assert not (data["root"] / "refused" / "zarr.json").exists()


@pytest.mark.parametrize(
    "text, needles",
    [
        ('{"ring": "donut",}', ["not valid JSON", "line 1"]),
        ('["ring", "donut"]', ["expected a non-empty JSON object"]),
        ('{"rnig": "donut"}', ["'rnig' is not a detector label", "did you mean 'ring'?"]),
        (
            '{"ring": "dount", "star": 99}',
            [
                "'ring' -> 'dount': no such dataset category (did you mean 'donut'?)",
                "'star' -> 99: no category has id 99",
                "donut (16)",
            ],
        ),
        ('{"ring": true}', ["must be a category name (string), a category id (integer) or null"]),
    ],
)
def test_a_bad_label_map_is_one_error_line_and_leaves_no_cache(data, tmp_path, text, needles):
    (tmp_path / "map.json").write_text(text)
    result = invoke(
        "extract",
        "--detector",
        "demo",
        "--images",
        data["images"],
        "--annotations",
        data["renamed"],
        "--out",
        tmp_path / "cache",
        "--label-map",
        tmp_path / "map.json",
        "--workers",
        0,
        "-q",
    )
    one_error_line(result, f"--label-map {tmp_path / 'map.json'}", *needles)
    assert not (tmp_path / "cache" / "zarr.json").exists()


def test_label_map_and_class_agnostic_exclude_each_other(data, tmp_path):
    result = invoke(
        "extract",
        "--detector",
        "demo",
        "--images",
        data["images"],
        "--annotations",
        data["renamed"],
        "--out",
        tmp_path / "cache",
        "--label-map",
        write_json(tmp_path / "m.json", FULL_MAP),
        "--class-agnostic",
        "-q",
    )
    one_error_line(result, "--label-map and --class-agnostic exclude each other")


def test_partial_map_warns_with_the_unreachable_categories_and_inspect_shows_the_map(data, caches):
    renamed = json.loads(data["renamed"].read_text())
    instances = Counter(a["category_id"] for a in renamed["annotations"] if not a["iscrowd"])
    write_json(data["root"] / "partial.json", PARTIAL_MAP)
    result = run_ok(
        "extract",
        "--detector",
        "demo",
        "--images",
        data["images"],
        "--annotations",
        data["renamed"],
        "--out",
        data["root"] / "partial",
        "--label-map",
        data["root"] / "partial.json",
        "--topk",
        40,
        "--target-size",
        16,
        "--workers",
        0,
        "-q",
    )
    text = " ".join(result.output.split())
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.output
    for part in (
        f"'wedge' (id 11, {instances[11]} GT instances)",
        f"'plus' (id 15, {instances[15]} GT instances)",
        "2 of 6 dataset categories",
        "--label-map FILE",
    ):
        assert part in text, text

    split = Cache(data["root"] / "partial").split("val")
    assert split.label_to_category.tolist() == [16, 12, 13, 14, -1, -1]  # cross and triangle: no category
    shown = " ".join(run_ok("inspect", data["root"] / "partial").output.split())
    assert (
        "labels (label map): ring -> donut (16), star -> asterisk (12), crescent -> moon (13), ell -> L (14)" in shown
    )
    assert f"never predicted): wedge ({instances[11]} GT), plus ({instances[15]} GT)" in shown

    # the unreachable categories are never predicted; detections of unmapped labels are dropped
    run = load_run(data["root"] / "run_map", Cache(caches["map"]).fingerprint, torch.device("cpu"))
    results = predict_split(run.head, run.config, split, torch.device("cpu"), progress=False)["head"]
    assert results and {r["category_id"] for r in results} <= {16, 12, 13, 14}


def test_full_map_scores_the_renamed_categories_exactly_as_the_original_names(data, caches):
    """The renamed cache holds the by-name cache's arrays; the head trained on it scores the same
    AP on both, its detections in the renamed categories."""
    by_name, mapped = Cache(caches["name"]).split("val"), Cache(caches["map"]).split("val")
    assert mapped.label_to_category.tolist() == [RENAMED[name][0] for name in CATEGORIES]
    keys = ("boxes", "labels", "scores", "query_index", "targets/gt_id", "targets/gt_iou", "targets/masks")
    for key, values in split_arrays(caches["map"], *keys).items():
        np.testing.assert_array_equal(values, split_arrays(caches["name"], key)[key], err_msg=key)

    seen = {}
    metrics = evaluate(
        cache_path=caches["map"],
        run_dir=data["root"] / "run_map",
        progress=False,
        on_results=lambda split, results: seen.setdefault("results", results),
    )
    assert metrics["class_agnostic"] is False and metrics["bbox"]["AP50"] > 0.5  # the trained demo detector
    run = load_run(data["root"] / "run_map", Cache(caches["map"]).fingerprint, torch.device("cpu"))
    reference = predict_split(run.head, run.config, by_name, torch.device("cpu"), progress=False, box_filled=True)
    assert [data["id_map"][r["category_id"]] for r in reference["head"]] == [r["category_id"] for r in seen["results"]]
    expected = score(by_name, reference)
    for key in ("segm", "bbox", "box_filled"):
        assert metrics[key] == expected[key], key


def test_class_agnostic_caches_each_query_once_and_eval_scores_one_class(data, caches):
    split = Cache(caches["agnostic"]).split("val")
    assert split.class_agnostic and Cache(caches["agnostic"]).settings.topk == 30  # the demo's 30 queries
    arrays = split_arrays(caches["agnostic"], "query_index", "targets/gt_id", "targets/gt_iou")
    assert all(len(set(row)) == len(row) for row in arrays["query_index"])  # each query once
    # targets match by box IoU whatever the class: the same (query -> GT, IoU) as the by-name cache
    named = split_arrays(caches["name"], "query_index", "targets/gt_id", "targets/gt_iou")
    compared = 0
    for i, queries in enumerate(arrays["query_index"]):
        where = {int(q): k for k, q in enumerate(named["query_index"][i])}
        for k, q in enumerate(queries):
            if int(q) in where:
                assert arrays["targets/gt_id"][i, k] == named["targets/gt_id"][i, where[int(q)]]
                assert arrays["targets/gt_iou"][i, k] == named["targets/gt_iou"][i, where[int(q)]]
                compared += 1
    assert compared >= 20

    seen = {}
    metrics = evaluate(
        cache_path=caches["agnostic"],
        run_dir=data["root"] / "run_agnostic",
        progress=False,
        on_results=lambda split, results: seen.setdefault("results", results),
    )
    results = seen["results"]
    assert metrics["class_agnostic"] is True and {r["category_id"] for r in results} == {AGNOSTIC_CATEGORY[0]}
    # the reference: every GT instance and result remapped to one category, scored per category as usual
    gt = split.coco()
    one = copy.deepcopy(gt.dataset)
    one["categories"] = [{"id": 1, "name": "object"}]
    for ann in one["annotations"]:
        ann["category_id"] = 1
    remapped = COCO()
    remapped.dataset = one
    remapped.createIndex()
    expected = coco_evaluate(remapped, results)
    assert metrics["segm"] == expected["segm"] and metrics["bbox"] == expected["bbox"]
    assert metrics["bbox"]["AP50"] > 0.5

    title = " ".join(
        run_ok(
            "eval",
            "--cache",
            caches["agnostic"],
            "--run",
            data["root"] / "run_agnostic",
            "--out",
            data["root"] / "agnostic_metrics.json",
            "-q",
        ).output.split()
    )
    assert "class-agnostic: all categories as one" in title
    shown = " ".join(run_ok("inspect", caches["agnostic"]).output.split())
    assert "labels (class-agnostic): every detection is a candidate, in one category 'object'" in shown


def test_predict_writes_the_dataset_categories_or_the_one_class_agnostic_category(data, caches, tmp_path):
    image = sorted(data["images"].glob("*.png"))[0]
    renamed = sorted((i, n) for i, n in RENAMED.values())
    for run, categories in (
        ("run_map", [{"id": i, "name": n} for i, n in renamed]),
        ("run_agnostic", [{"id": 1, "name": "object"}]),
    ):
        out = tmp_path / run
        run_ok("predict", "--detector", "demo", "--run", data["root"] / run, image, "--out", out, "-q")
        images = json.loads((out / "images.json").read_text())
        results = json.loads((out / "results.json").read_text())
        assert images["categories"] == categories
        assert results and {r["category_id"] for r in results} <= {c["id"] for c in categories}
    assert len(results) == len({tuple(r["bbox"]) for r in results})  # class-agnostic: each query once


def test_a_changed_mapping_is_another_cache(data, caches):
    write_json(data["root"] / "other.json", {**FULL_MAP, "cross": None})
    for option, why in (
        (["--label-map", data["root"] / "other.json"], "'cross': \"plus\" in the cache, null asked for"),
        (["--class-agnostic"], "(asked for class-agnostic labels)"),
    ):
        result = invoke(
            "extract",
            "--detector",
            "demo",
            "--images",
            data["images"],
            "--annotations",
            data["renamed"],
            "--out",
            caches["map"],
            "--topk",
            40,
            "--target-size",
            16,
            "--workers",
            0,
            "-q",
            *option,
        )
        one_error_line(result, f"cache {caches['map']} was made with", why, "another label mapping is another cache")
    result = invoke("eval", "--cache", caches["agnostic"], "--run", data["root"] / "run_map", "-q")
    one_error_line(result, "was trained on a cache made with label map", "asked for class-agnostic labels")


def test_labels_merged_into_one_category_are_reported_once_per_query():
    mapping = resolve_labels(
        ("car", "truck", "person"),
        {1: "vehicle", 2: "person"},
        {"car": "vehicle", "truck": 1},
        annotations=[{"category_id": 2}],
    )
    assert mapping.label_to_category == [1, 1, 2] and mapping.unmapped == {}
    # null drops a label; labels the map leaves out map by name; crowd instances are not counted
    dropped = resolve_labels(
        ("car", "person"),
        {1: "car", 2: "person"},
        {"person": None},
        annotations=[{"category_id": 2}, {"category_id": 2, "iscrowd": 1}],
    )
    assert dropped.label_to_category == [1, -1] and dropped.unmapped == {2: 1}
    with pytest.raises(MfcacheError, match="none of the detector's labels"):
        resolve_labels(("person",), {1: "vehicle", 2: "person"}, {"person": None}, annotations=[])
    # query 7 listed as car and truck (both vehicle): reported once; query 3 as car and person: twice
    labels = torch.tensor([[0, 1, 0, 2]])
    query_index = torch.tensor([[7, 7, 3, 3]])
    kept = kept_queries(labels, torch.tensor(mapping.label_to_category), 10, query_index)
    assert kept.tolist() == [[True, False, True, True]]
    assert kept_queries(labels, torch.tensor(mapping.label_to_category), 10).tolist() == [[True] * 4]
