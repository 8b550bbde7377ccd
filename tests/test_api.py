"""The Python API (`mfcache.api.Predictor`): the same detections as `mfcache predict`, from any
image form, and the README's example as written."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfcache.api import Instances, Predictor
from mfcache.data.shapes import CATEGORIES
from mfcache.errors import MfcacheError
from tests.helpers import ROOT
from tests.helpers.cli import invoke

README = ROOT / "README.md"
API_PAGE = ROOT / "docs" / "api.md"
MARKER = "<!-- runnable -->"

# The README's "Python API" example, verbatim: test_readme_shows_this_example checks that the README's
# block (the ```python block after MARKER) is this text, test_the_readme_example_runs runs it. It
# assumes `mfcache demo` ran in the current folder (the fixture below builds that layout, smaller).
EXAMPLE = """\
from pathlib import Path

import numpy as np
from PIL import Image

from mfcache.api import Predictor

# the run `mfcache demo` trained; the detector is the one its cache was extracted with
predictor = Predictor("mfcache-demo/run")
image = sorted(Path("mfcache-demo/data/val").glob("*.png"))[0]

result = predictor(image)  # also a PIL image, an [H, W, 3] uint8 array or a [3, H, W] tensor
print(f"{len(result)} instances in a {result.image_size} image: masks {tuple(result.masks.shape)}")
confident = result[result.scores >= 0.3]  # index like a tensor: a bool mask, a slice, indices
for name, score, box in zip(confident.names, confident.scores, confident.boxes):
    print(f"{name:>10} {score:.2f} box {[round(v) for v in box.tolist()]}")

# a list in, a list out; results.json's entries for this image, as `mfcache predict` writes them
pil = Image.open(image)
results = predictor([pil, np.asarray(pil.convert("RGB"))])
coco = results[0].to_coco(image_id=1)
"""


@pytest.fixture(scope="module")
def demo_dir(demo_layout):
    """``mfcache demo``'s layout, small (conftest.py: ``demo_layout``)."""
    return demo_layout


@pytest.fixture(scope="module")
def predictor(demo_dir):
    return Predictor(demo_dir / "mfcache-demo" / "run", device="cpu")


@pytest.fixture(scope="module")
def predicted(demo_dir, tmp_path_factory):
    """``mfcache predict`` (detector from the run, as the Predictor) on the first val image:
    (image path, its results.json entries)."""
    image = sorted((demo_dir / "mfcache-demo" / "data" / "val").glob("*.png"))[0]
    out = tmp_path_factory.mktemp("predicted")
    result = invoke("predict", "--run", demo_dir / "mfcache-demo" / "run", image, "--out", out, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    return image, json.loads((out / "results.json").read_text())


def image_forms(path: Path) -> dict:
    pil = Image.open(path)
    hwc = np.asarray(pil.convert("RGB"))
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    return {
        "str": str(path),
        "pil": pil,
        "rgba numpy": np.dstack([hwc, np.full(hwc.shape[:2], 7, np.uint8)]),
        "tensor": chw,
        "float tensor": chw.float() / 255,
    }


def test_every_image_form_gives_what_predict_writes(predictor, predicted):
    image, written = predicted
    assert written  # the 2-step head still reports the detector's 100 detections
    width, height = Image.open(image).size
    for form, value in image_forms(image).items():
        found = predictor(value)
        assert isinstance(found, Instances), form
        assert found.to_coco(1) == written, form
        n = len(written)
        assert found.masks.shape == (n, height, width) and found.masks.dtype == torch.bool, form
        assert found.boxes.shape == (n, 4) and found.scores.shape == (n,) and found.labels.shape == (n,), form
    assert set(found.labels.tolist()) <= set(range(1, len(CATEGORIES) + 1))  # dataset category ids
    assert found.category_names == dict(enumerate(CATEGORIES, start=1)) == predictor.category_names
    assert found.names == [CATEGORIES[c - 1] for c in found.labels.tolist()]
    assert predictor.detector == "demo"  # from the run's cache fingerprint


def test_a_list_or_batch_gives_one_result_per_image_in_order(predictor, demo_dir):
    first, second = sorted((demo_dir / "mfcache-demo" / "data" / "val").glob("*.png"))
    alone = [predictor(first).to_coco(1), predictor(second).to_coco(1)]
    assert alone[0] != alone[1]
    listed = predictor([first, Image.open(second)])
    assert [r.to_coco(1) for r in listed] == alone
    stacked = image_forms(first)["tensor"][None]  # a [B, 3, H, W] batch, B = 1
    assert [r.to_coco(1) for r in predictor(stacked)] == [alone[0]]
    assert predictor([]) == []


def test_score_threshold_keeps_the_confident_detections(predictor, predicted):
    image, _ = predicted
    everything = predictor(image)
    threshold = float(everything.scores.median())
    confident = predictor(image, score_threshold=threshold)
    assert 0 < len(confident) < len(everything)
    expected = everything[everything.scores >= threshold]
    assert torch.equal(confident.masks, expected.masks) and torch.equal(confident.boxes, expected.boxes)
    assert torch.equal(confident.labels, expected.labels) and confident.to_coco(3) == expected.to_coco(3)
    assert len(everything[0]) == 1 and len(everything[-1]) == 1 and len(everything[:5]) == 5
    none = predictor(image, score_threshold=1.0)
    assert len(none) == 0 and none.image_size == everything.image_size and none.to_coco(1) == []


@pytest.mark.parametrize(
    "bad, needle",
    [
        (np.zeros((5, 5, 2), np.uint8), "1, 3 or 4 channels"),
        (torch.full((3, 5, 5), 2.0), "values in [0, 1]"),
        (np.zeros((5, 5, 3), np.int32), "uint8 or float"),
        (b"\x89PNG", "cannot read an image from 'bytes'"),
    ],
)
def test_bad_images_are_one_clear_error(predictor, bad, needle):
    with pytest.raises(MfcacheError) as caught:
        predictor(bad)
    assert needle in str(caught.value)


class Settings:
    """A type beyond tensors, containers and numbers: a checkpoint holding one loads only when trusted."""


def test_loading_errors_name_the_python_arguments(demo_dir, tmp_path):
    run = demo_dir / "mfcache-demo" / "run"
    with pytest.raises(MfcacheError, match="no trained head"):
        Predictor(tmp_path)
    with pytest.raises(MfcacheError, match="unknown detector spec"):
        Predictor(run, detector="nope:x")
    with pytest.raises(MfcacheError, match="score_threshold"):
        Predictor(run, score_threshold=1.5)

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    torch.save({**state, "extra": Settings()}, copy / "checkpoint.pt")
    with pytest.raises(MfcacheError, match=r"Settings.*pass `trust_checkpoint=True`") as caught:
        Predictor(copy)
    assert "--trust-checkpoint" not in str(caught.value)
    moved = tmp_path / "moved"  # a run whose cache was extracted with a detector folder that is gone
    shutil.copytree(run, moved)
    state = torch.load(moved / "checkpoint.pt", weights_only=True)
    state["fingerprint"]["detector"]["spec"] = f"hf:{tmp_path / 'gone'}"
    torch.save(state, moved / "checkpoint.pt")
    with pytest.raises(
        MfcacheError, match="the detector the run's cache was extracted with.*with `detector`"
    ) as caught:
        Predictor(moved)
    assert "--detector" not in str(caught.value)
    assert Predictor(moved, detector="demo").detector == "demo"
    assert (
        len(
            Predictor(copy, trust_checkpoint=True, device="cpu")(
                sorted((demo_dir / "mfcache-demo" / "data" / "val").glob("*.png"))[0]
            )
        )
        > 0
    )


def test_the_readme_example_runs(demo_dir, predicted, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    namespace: dict = {}
    exec(compile(EXAMPLE, "README example", "exec"), namespace)
    assert namespace["coco"] == predicted[1]
    n = len(predicted[1])
    assert re.search(
        rf"^{n} instances in a \(\d+, \d+\) image: masks \({n}, \d+, \d+\)$", capsys.readouterr().out, re.MULTILINE
    )


@pytest.mark.parametrize("page", [README, API_PAGE], ids=lambda p: p.name)
def test_readme_shows_this_example(page):
    """The Python API block of README.md and docs/api.md is EXAMPLE, the text
    test_the_readme_example_runs runs (tests/guarantees/test_docs.py runs every runnable block too)."""
    blocks = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", page.read_text(), re.DOTALL)
    assert EXAMPLE in blocks, f"{page.name} has no runnable Python block equal to the API example"


def test_import_mfcache_stays_light():
    """``import mfcache`` (the CLI's first import) loads neither torch nor the API."""
    from tests.helpers.processes import loaded_after

    light = loaded_after("import mfcache")
    assert "torch" not in light and "mfcache.api" not in light
