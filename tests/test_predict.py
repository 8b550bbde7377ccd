"""`mfcache predict` on arbitrary images, and `mfcache eval --visualize`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from mfcache.cache.reader import Cache
from mfcache.cli.main import app
from mfcache.data.shapes import CATEGORIES
from mfcache.stages.evaluate import evaluate
from mfcache.errors import MfcacheError
from mfcache.stages.visualize import visualize_split

runner = CliRunner()


def cli(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory):
    """A cache of 2 val images (detector batch 1) and a head trained 2 steps on it, which
    evaluates one image at a time (so eval and predict batch exactly alike)."""
    root = tmp_path_factory.mktemp("predict")
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())
    keep = {im["id"] for im in val["images"][:2]}
    subset = {**val, "images": val["images"][:2], "annotations": [a for a in val["annotations"] if a["image_id"] in keep]}
    (root / "val.json").write_text(json.dumps(subset))
    cli("extract", "--detector", "demo", "--images", shapes_data / "val", "--annotations", root / "val.json",
        "--out", root / "cache", "--batch-size", 1, "--workers", 0, "-q")
    cli("train", "--cache", root / "cache", "--out", root / "run", "--set", "train.steps=2",
        "--set", "train.batch_size=2", "--set", "eval.batch_size=1", "-q")
    return root


def mixed_folder(shapes_data, folder):
    """Val image 1 as it is (an RGB PNG), val image 2 as grayscale, RGBA, JPEG and 16-bit
    PNG, and a file that is not an image."""
    folder.mkdir()
    first, second = sorted((shapes_data / "val").glob("*.png"))[:2]
    shutil.copy(first, folder / first.name)
    rgb = Image.open(second).convert("RGB")
    rgb.convert("L").save(folder / "g_gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "g_rgba.png")
    rgb.save(folder / "g_photo.jpg", quality=90)
    deep = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(folder / "g_deep.png")
    assert Image.open(folder / "g_deep.png").mode.startswith("I")
    (folder / "notes.txt").write_text("not an image")
    return first, rgb.size


def test_predict_mixed_formats_loads_in_pycocotools_and_matches_eval(trained, shapes_data, tmp_path):
    first, size = mixed_folder(shapes_data, tmp_path / "in")
    out = tmp_path / "out"
    printed = cli("predict", "--detector", "demo", "--run", trained / "run", tmp_path / "in", "--out", out,
                  "--score-threshold", 0, "-q")
    assert "5 images" in printed and "overlays" in printed

    gt = COCO(str(out / "images.json"))
    names = [first.name, "g_deep.png", "g_gray.png", "g_photo.jpg", "g_rgba.png"]
    images = [gt.imgs[i] for i in range(1, 6)]
    assert [im["file_name"] for im in images] == [str((tmp_path / "in" / n).resolve()) for n in names]
    for im in images[1:]:
        assert (im["width"], im["height"]) == size
    assert [(c["id"], c["name"]) for c in gt.dataset["categories"]] == list(enumerate(CATEGORIES, start=1))
    dt = gt.loadRes(str(out / "results.json"))
    assert {a["image_id"] for a in dt.dataset["annotations"]} == set(range(1, 6))
    for im in images:
        picture = Image.open(out / "overlays" / f"{im['file_name'].rsplit('/', 1)[1].rsplit('.', 1)[0]}.png")
        assert picture.size == (im["width"], im["height"]) and picture.mode == "RGB"
        pixels = np.asarray(Image.open(im["file_name"]).convert("RGB"))
        assert (np.asarray(picture) != pixels).any()  # something was drawn (threshold 0)
    assert not list(out.glob(".predict-*"))

    # a cached image: predict gives exactly what eval computes from the cache
    captured = {}
    evaluate(cache_path=trained / "cache", run_dir=trained / "run", out=tmp_path / "metrics.json", progress=False,
             on_results=lambda split, results: captured.update(results=results))
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())
    id_of = {im["file_name"]: im["id"] for im in val["images"]}
    predicted = json.loads((out / "results.json").read_text())
    ours = [{**r, "image_id": None} for r in predicted if r["image_id"] == 1]
    theirs = [{**r, "image_id": None} for r in captured["results"] if r["image_id"] == id_of[first.name]]
    assert ours and ours == theirs


def test_predict_on_an_int8_cache_matches_eval(shapes_data, tmp_path):
    """Features go through int8 storage exactly as the cache stored and the reader served them."""
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())
    first = val["images"][0]
    subset = {**val, "images": [first], "annotations": [a for a in val["annotations"] if a["image_id"] == first["id"]]}
    (tmp_path / "val.json").write_text(json.dumps(subset))
    cli("extract", "--detector", "demo", "--images", shapes_data / "val", "--annotations", tmp_path / "val.json",
        "--out", tmp_path / "cache", "--dtype", "int8", "--batch-size", 1, "--workers", 0, "-q")
    cli("train", "--cache", tmp_path / "cache", "--out", tmp_path / "run", "--set", "train.steps=1",
        "--set", "train.batch_size=1", "--set", "eval.batch_size=1", "-q")
    cli("predict", "--detector", "demo", "--run", tmp_path / "run", shapes_data / "val" / first["file_name"],
        "--out", tmp_path / "out", "-q")
    captured = {}
    evaluate(cache_path=tmp_path / "cache", run_dir=tmp_path / "run", out=tmp_path / "metrics.json", progress=False,
             on_results=lambda split, results: captured.update(results=results))
    ours = [{**r, "image_id": None} for r in json.loads((tmp_path / "out" / "results.json").read_text())]
    theirs = [{**r, "image_id": None} for r in captured["results"]]
    assert ours and ours == theirs


def test_predict_falls_back_to_detector_labels_without_the_cache(trained, shapes_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**meta, "cache": str(tmp_path / "moved")}))
    image = sorted((shapes_data / "train").glob("*.png"))[0]
    cli("predict", "--detector", "demo", "--run", run, image, "--out", tmp_path / "out", "-q")
    written = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [c["name"] for c in written["categories"]] == list(CATEGORIES)
    assert (tmp_path / "out" / "overlays" / f"{image.stem}.png").is_file()


def test_predict_errors_name_the_culprit_and_leave_nothing(trained, shapes_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((shapes_data / "val").glob("*.png"))[0], folder / "good.png")  # sorts after broken.png
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    printed = cli("predict", "--detector", "demo", "--run", trained / "run", folder, "--out", out, "-q", ok=False)
    assert printed.startswith("error:") and "broken.png" in printed and "Traceback" not in printed
    assert sorted(p.name for p in out.iterdir()) == []  # nothing half-written, no staging folder
    printed = cli("predict", "--detector", "demo", "--run", trained / "run", tmp_path / "nope.png", "--out", out, "-q",
                  ok=False)
    assert "nope.png" in printed


def test_predict_rejects_a_run_trained_for_another_detector(trained, shapes_data, tmp_path):
    from mfcache.detectors.demo import build_demo_model

    build_demo_model(seed=1).save_pretrained(tmp_path / "other")
    printed = cli("predict", "--detector", f"hf:{tmp_path / 'other'}", "--run", trained / "run",
                  shapes_data / "val", "--out", tmp_path / "out", "-q", ok=False)
    assert "error:" in printed and "another detector" in " ".join(printed.split())
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_visualize_writes_panels(trained, tmp_path):
    printed = cli("eval", "--cache", trained / "cache", "--run", trained / "run", "--out", tmp_path / "m" / "metrics.json",
                  "--visualize", 2, "-q")
    split = Cache(trained / "cache").split("val")
    panels = sorted((tmp_path / "m" / "visualize").iterdir())
    ids = [int(i) for i in split.index["image_id"][:2]]
    assert [p.name for p in panels] == sorted(f"{i}.png" for i in ids) and "visualize" in printed
    for image_id, (h, w) in zip(ids, split.index["orig_hw"][:2].tolist()):
        sheet = Image.open(tmp_path / "m" / "visualize" / f"{image_id}.png")
        assert sheet.width == 2 * w + 8 and sheet.height > h

    with pytest.raises(MfcacheError, match="image folder .* is gone"):
        visualize_split(split, [], tmp_path / "v", 1, images_dir=tmp_path / "gone")
    # a moved image folder is named with --images
    moved = tmp_path / "moved"
    shutil.copytree(split.attrs["images_dir"], moved)
    cli("eval", "--cache", trained / "cache", "--run", trained / "run", "--out", tmp_path / "n" / "metrics.json",
        "--visualize", 1, "--images", moved, "-q")
    assert len(list((tmp_path / "n" / "visualize").iterdir())) == 1
    printed = cli("eval", "--cache", trained / "cache", "--run", trained / "run", "--out", tmp_path / "o" / "metrics.json",
                  "--visualize", 1, "--images", tmp_path / "gone", "-q", ok=False)
    assert "is gone" in " ".join(printed.split())
