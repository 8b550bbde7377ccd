"""`mfcache predict` on arbitrary images, and `mfcache eval --visualize`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mfcache.cache.reader import Cache
from mfcache.data.shapes import CATEGORIES
from mfcache.errors import MfcacheError
from mfcache.stages.evaluate import evaluate
from mfcache.stages.predict_inputs import find_images
from mfcache.stages.visualize import visualize_split
from tests.helpers.cli import invoke, one_error_line, run_ok


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory):
    """A cache of 2 val images (detector batch 1) and a head trained 2 steps on it, which
    evaluates one image at a time (so eval and predict batch exactly alike)."""
    root = tmp_path_factory.mktemp("predict")
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())
    keep = {im["id"] for im in val["images"][:2]}
    subset = {
        **val,
        "images": val["images"][:2],
        "annotations": [a for a in val["annotations"] if a["image_id"] in keep],
    }
    (root / "val.json").write_text(json.dumps(subset))
    run_ok(
        "extract",
        "--detector",
        "demo",
        "--images",
        shapes_data / "val",
        "--annotations",
        root / "val.json",
        "--out",
        root / "cache",
        "--batch-size",
        1,
        "--workers",
        0,
        "-q",
    )
    run_ok(
        "train",
        "--cache",
        root / "cache",
        "--out",
        root / "run",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "--set",
        "eval.batch_size=1",
        "-q",
    )
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
    printed = run_ok(
        "predict",
        "--detector",
        "demo",
        "--run",
        trained / "run",
        tmp_path / "in",
        "--out",
        out,
        "--score-threshold",
        0,
        "-q",
    ).output
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
        rgba = im["file_name"].endswith("g_rgba.png")  # the input's alpha is kept, exactly
        assert picture.size == (im["width"], im["height"]) and picture.mode == ("RGBA" if rgba else "RGB")
        if rgba:
            assert (np.asarray(picture.getchannel("A")) == 128).all()
        pixels = np.asarray(Image.open(im["file_name"]).convert("RGB"))
        assert (np.asarray(picture.convert("RGB")) != pixels).any()  # something was drawn (threshold 0)
    assert not list(out.glob(".predict-*"))

    # a cached image: predict gives exactly what eval computes from the cache
    captured = {}
    evaluate(
        cache_path=trained / "cache",
        run_dir=trained / "run",
        out=tmp_path / "metrics.json",
        progress=False,
        on_results=lambda split, results: captured.update(results=results),
    )
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
    run_ok(
        "extract",
        "--detector",
        "demo",
        "--images",
        shapes_data / "val",
        "--annotations",
        tmp_path / "val.json",
        "--out",
        tmp_path / "cache",
        "--dtype",
        "int8",
        "--batch-size",
        1,
        "--workers",
        0,
        "-q",
    )
    run_ok(
        "train",
        "--cache",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
        "--set",
        "train.steps=1",
        "--set",
        "train.batch_size=1",
        "--set",
        "eval.batch_size=1",
        "-q",
    )
    run_ok(
        "predict",
        "--detector",
        "demo",
        "--run",
        tmp_path / "run",
        shapes_data / "val" / first["file_name"],
        "--out",
        tmp_path / "out",
        "-q",
    )
    captured = {}
    evaluate(
        cache_path=tmp_path / "cache",
        run_dir=tmp_path / "run",
        out=tmp_path / "metrics.json",
        progress=False,
        on_results=lambda split, results: captured.update(results=results),
    )
    ours = [{**r, "image_id": None} for r in json.loads((tmp_path / "out" / "results.json").read_text())]
    theirs = [{**r, "image_id": None} for r in captured["results"]]
    assert ours and ours == theirs


def test_predict_falls_back_to_detector_labels_without_the_cache(trained, shapes_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**meta, "cache": str(tmp_path / "moved")}))
    image = sorted((shapes_data / "train").glob("*.png"))[0]
    run_ok("predict", "--detector", "demo", "--run", run, image, "--out", tmp_path / "out", "-q")
    written = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [c["name"] for c in written["categories"]] == list(CATEGORIES)
    assert (tmp_path / "out" / "overlays" / f"{image.stem}.png").is_file()


def test_predict_errors_name_the_culprit_and_leave_nothing(trained, shapes_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((shapes_data / "val").glob("*.png"))[0], folder / "good.png")  # sorts after broken.png
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    one_error_line(
        invoke("predict", "--detector", "demo", "--run", trained / "run", folder, "--out", out, "-q"), "broken.png"
    )
    assert sorted(p.name for p in out.iterdir()) == []  # nothing half-written, no staging folder
    one_error_line(
        invoke("predict", "--detector", "demo", "--run", trained / "run", tmp_path / "nope.png", "--out", out, "-q"),
        "nope.png",
    )


def test_predict_rejects_a_run_trained_for_another_detector(trained, shapes_data, tmp_path):
    from mfcache.detectors.demo import build_demo_model

    build_demo_model(seed=1).save_pretrained(tmp_path / "other")
    result = invoke(
        "predict",
        "--detector",
        f"hf:{tmp_path / 'other'}",
        "--run",
        trained / "run",
        shapes_data / "val",
        "--out",
        tmp_path / "out",
        "-q",
    )
    one_error_line(result, "another detector")
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_visualize_writes_panels(trained, tmp_path):
    printed = run_ok(
        "eval",
        "--cache",
        trained / "cache",
        "--run",
        trained / "run",
        "--out",
        tmp_path / "m" / "metrics.json",
        "--visualize",
        2,
        "-q",
    ).output
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
    run_ok(
        "eval",
        "--cache",
        trained / "cache",
        "--run",
        trained / "run",
        "--out",
        tmp_path / "n" / "metrics.json",
        "--visualize",
        1,
        "--images",
        moved,
        "-q",
    )
    assert len(list((tmp_path / "n" / "visualize").iterdir())) == 1
    result = invoke(
        "eval",
        "--cache",
        trained / "cache",
        "--run",
        trained / "run",
        "--out",
        tmp_path / "o" / "metrics.json",
        "--visualize",
        1,
        "--images",
        tmp_path / "gone",
        "-q",
    )
    one_error_line(result, "is gone")


# --- predict options: --skip-bad, --recursive, --masks, --no-overlays; eval --force and stale panels ---


def test_skip_bad_reports_and_skips_corrupt_images(trained, shapes_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((shapes_data / "val").glob("*.png"))[:2]
    shutil.copy(good[0], folder / "a.png")
    Image.open(good[1]).convert("RGB").save(folder / "c.jpg", quality=90)
    data = (folder / "c.jpg").read_bytes()
    (folder / "b_cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG: the header reads, the pixels do not
    (folder / "d_junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"

    failed = invoke("predict", "--run", trained / "run", folder, "--out", out, "-q", code=1)
    assert "b_cut.jpg" in failed.stderr and "--skip-bad" in failed.stderr and not any(out.iterdir())

    done = run_ok("predict", "--run", trained / "run", folder, "--out", out, "-q", "--skip-bad", "--json")
    summary = json.loads(done.stdout)
    assert [(s["image_id"], s["file"]) for s in summary["skipped"]] == [
        (2, str(folder / "b_cut.jpg")),
        (4, str(folder / "d_junk.png")),
    ]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "b_cut.jpg" in warnings[0] and "d_junk.png" in warnings[1]
    assert [im["image_id"] for im in summary["per_image"]] == [1, 3] and summary["num_images"] == 2
    coco = COCO(str(out / "images.json"))  # ids keep their input positions: a skipped id is unused
    assert sorted(coco.imgs) == [1, 3]
    assert {r["image_id"] for r in json.loads((out / "results.json").read_text())} == {1, 3}
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "c.png"]
    printed = run_ok("predict", "--run", trained / "run", folder, "--out", out, "-q", "--skip-bad").stdout
    assert "2 images" in printed and "2 skipped" in printed and "b_cut.jpg" in printed

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(folder / "d_junk.png", only_bad)
    failed = invoke("predict", "--run", trained / "run", only_bad, "--out", tmp_path / "o2", "-q", "--skip-bad", code=1)
    assert "none of the 1 images" in failed.stderr


def test_recursive_folders_keep_relative_names(trained, shapes_data, tmp_path):
    image = sorted((shapes_data / "val").glob("*.png"))[0]
    folder = tmp_path / "in"
    for sub in (".", "sub", "sub/deeper", ".hidden"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / sub / "a.png")
    shutil.copy(image, folder / "sub" / "a.jpg")  # the same stem in the same folder: -<id>
    out = folder / "predictions"  # inside the input folder: never read back
    (out / "overlays").mkdir(parents=True)
    shutil.copy(image, out / "overlays" / "old.png")

    summary = json.loads(run_ok("predict", "--run", trained / "run", folder, "--out", out, "-q", "-r", "--json").stdout)
    files = [Path(im["file"]).relative_to(folder).as_posix() for im in summary["per_image"]]
    assert files == ["a.png", "sub/a.jpg", "sub/a.png", "sub/deeper/a.png"]  # not .hidden/, not --out
    overlays = [Path(im["overlay"]).relative_to(out / "overlays").as_posix() for im in summary["per_image"]]
    assert overlays == ["a.png", "sub/a.png", "sub/a-3.png", "sub/deeper/a.png"]
    assert all(Path(im["overlay"]).is_file() for im in summary["per_image"])

    # without --recursive only the folder's own files; a folder of folders says how to read them
    assert [(i.path, i.name) for i in find_images([folder])] == [(folder / "a.png", "a")]
    assert [i.name for i in find_images([folder, folder / "sub"])] == ["a", "a-2", "a-3"]
    nested = tmp_path / "nested"
    (nested / "x").mkdir(parents=True)
    shutil.copy(image, nested / "x" / "a.png")
    failed = invoke("predict", "--run", trained / "run", nested, "--out", tmp_path / "o", "-q", code=1)
    assert "--recursive" in failed.stderr and "no image files" in failed.stderr


def _by_image(out):
    results = json.loads((out / "results.json").read_text())
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return by_image


def test_mask_pngs_decode_to_the_results_masks(trained, shapes_data, tmp_path):
    import pycocotools.mask as mask_utils

    image = sorted((shapes_data / "val").glob("*.png"))[0]
    threshold = 0.05
    out = tmp_path / "inst"
    summary = json.loads(
        run_ok(
            "predict",
            "--run",
            trained / "run",
            image,
            "--out",
            out,
            "-q",
            "--masks",
            "instance",
            "--no-overlays",
            "--score-threshold",
            threshold,
            "--json",
        ).stdout
    )
    assert not (out / "overlays").exists() and summary["overlays"] is None
    assert summary["per_image"][0]["overlay"] is None
    results = _by_image(out)[1]
    names = {c["id"]: c["name"] for c in json.loads((out / "images.json").read_text())["categories"]}
    drawn = {k: r for k, r in enumerate(results, start=1) if r["score"] >= threshold}
    assert 0 < len(drawn) < len(results) and summary["per_image"][0]["drawn"] == len(drawn)
    pngs = sorted((out / "masks" / image.stem).iterdir())
    assert [p.name for p in pngs] == sorted(f"{k:03d}_{names[r['category_id']]}.png" for k, r in drawn.items())
    for png in pngs:
        r = drawn[int(png.name.split("_")[0])]
        assert np.array_equal(np.asarray(Image.open(png)), mask_utils.decode(r["segmentation"]).astype(bool))

    out = tmp_path / "label"
    run_ok(
        "predict",
        "--run",
        trained / "run",
        image,
        "--out",
        out,
        "-q",
        "--masks",
        "label",
        "--score-threshold",
        threshold,
    )
    label = np.asarray(Image.open(out / "masks" / f"{image.stem}.png"))
    assert label.dtype == np.uint16 and (out / "overlays" / f"{image.stem}.png").is_file()
    expected = np.zeros_like(label)
    for k, r in sorted(drawn.items(), key=lambda kr: kr[1]["score"]):  # the best painted last, on top
        expected[mask_utils.decode(r["segmentation"]).astype(bool)] = k
    assert np.array_equal(label, expected) and set(np.unique(label)) - {0} <= set(drawn)


def test_masks_are_pasted_a_chunk_at_a_time(trained, shapes_data, tmp_path, monkeypatch):
    """predict never holds every mask of an image at full size: with a budget of one image's
    pixels each paste holds one mask, and the results are the same as with all at once."""
    import mfcache.stages.postprocess as post
    from mfcache.stages.predict import predict_images

    image = sorted((shapes_data / "val").glob("*.png"))[0]
    args = {"run_dir": trained / "run", "inputs": [image], "progress": False, "score_threshold": 0.05, "masks": "label"}
    predict_images(out=tmp_path / "all", **args)
    width, height = Image.open(image).size
    monkeypatch.setattr(post, "CHUNK_PIXELS", width * height)
    sizes = []
    paste = post.paste_masks
    monkeypatch.setattr(
        post, "paste_masks", lambda masks, *a, **k: sizes.append(masks.shape[0]) or paste(masks, *a, **k)
    )
    predict_images(out=tmp_path / "chunked", **args)
    assert sizes and max(sizes) == 1
    for name in ("results.json", f"masks/{image.stem}.png", f"overlays/{image.stem}.png"):
        assert (tmp_path / "all" / name).read_bytes() == (tmp_path / "chunked" / name).read_bytes(), name


def test_eval_refuses_metrics_of_another_cache_without_force(trained, tmp_path):
    out = tmp_path / "metrics.json"
    args = ("eval", "--cache", trained / "cache", "--run", trained / "run", "--out", out, "-q")
    run_ok(*args)
    metrics = json.loads(out.read_text())
    assert metrics["cache"]["path"] == str((trained / "cache").resolve())
    assert len(metrics["cache"]["fingerprint_sha256"]) == 64 and metrics["cache"]["annotations_sha256"]
    run_ok(*args)  # the same cache again: replaced
    other = {**metrics, "cache": {**metrics["cache"], "fingerprint_sha256": "0" * 64, "path": "/elsewhere"}}
    out.write_text(json.dumps(other))
    failed = invoke(*args, code=1)
    assert "another cache" in failed.stderr and "/elsewhere" in failed.stderr and "--force" in failed.stderr
    assert json.loads(out.read_text()) == other  # untouched
    run_ok(*args, "--force")
    assert json.loads(out.read_text())["cache"] == metrics["cache"]
    out.write_text("my notes")
    assert "not a metrics file" in invoke(*args, code=1).stderr and out.read_text() == "my notes"


def test_eval_visualize_replaces_stale_panels_only(trained, tmp_path):
    out = tmp_path / "m" / "metrics.json"
    args = ("eval", "--cache", trained / "cache", "--run", trained / "run", "--out", out, "-q")
    run_ok(*args, "--visualize", 2)
    panels = tmp_path / "m" / "visualize"
    first = sorted(p.name for p in panels.iterdir())
    assert len(first) == 2
    (panels / "99999.png").write_bytes(b"stale")  # a panel of an image this eval does not draw
    (panels / "mine.png").write_bytes(b"kept")  # not a name mfcache writes
    (panels / "notes.txt").write_text("kept")
    run_ok(*args, "--visualize", 1)
    left = sorted(p.name for p in panels.iterdir())
    assert (
        len(left) == 3 and {"mine.png", "notes.txt"} < set(left) and set(left) - {"mine.png", "notes.txt"} < set(first)
    )
