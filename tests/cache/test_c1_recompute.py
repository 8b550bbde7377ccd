"""--c1 recompute: C1 is not stored but re-made from the image, equal to the stored one."""

import json

import pytest
import torch

import mfcache.detectors
from mfcache.cache.c1_stem import STEM_ARRAY
from mfcache.cache.reader import Cache
from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.data.shapes import CATEGORIES
from mfcache.errors import MfcacheError
from mfcache.stages.extract import extract
from mfcache.stages.train import train


def cache(shapes_data, out, c1):
    extract(
        detector="demo",
        images=shapes_data / "train",
        annotations=shapes_data / "annotations" / "train.json",
        out=out,
        config=ExtractConfig(c1=c1, batch_size=1, num_workers=0, device="cpu"),
        progress=False,
    )
    return Cache(out).split("train")


def test_recomputed_c1_equals_the_stored_one_and_training_never_loads_the_detector(shapes_data, tmp_path, monkeypatch):
    stored = cache(shapes_data, tmp_path / "stored", "store")
    recomputed = cache(shapes_data, tmp_path / "recompute", "recompute")
    assert "c1" not in recomputed.group and STEM_ARRAY in Cache(tmp_path / "recompute").root
    for i in range(recomputed.num_rows):  # the stored stem runs: this user's extraction exported it
        a = stored.read(i, levels=(0,), targets=False).c1.float()
        b = recomputed.read(i, levels=(0,), targets=False).c1
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-3)  # the stored map is fp16

    def no_detector(*args, **kwargs):
        raise AssertionError("training loaded the detector")

    monkeypatch.setattr(mfcache.detectors, "load_detector", no_detector)
    last = train(
        cache_path=tmp_path / "recompute",
        run_dir=tmp_path / "run",
        progress=False,
        config=resolve_run_config(
            "box_baseline", ["train.steps=2", "train.batch_size=2", "train.min_iou=0.0", "train.num_workers=0"]
        ),
    )
    assert last["step"] == 2


def test_a_moved_image_folder_is_a_clear_error(shapes_data, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(shapes_data / "train", images)
    extract(
        detector="demo",
        images=images,
        annotations=shapes_data / "annotations" / "train.json",
        out=tmp_path / "c",
        config=ExtractConfig(c1="recompute", num_workers=0, device="cpu"),
        progress=False,
    )
    shutil.rmtree(images)
    with pytest.raises(MfcacheError, match="is gone"):
        Cache(tmp_path / "c").split("train").read(0)


# ----------------------------------------------------------------------------- native detectors
NATIVE_TINY = {
    "d_model": 32,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 1,
    "dim_feedforward": 48,
    "enc_n_points": 2,
    "dec_n_points": 2,
    "num_queries": 10,
}
SWIN_MICRO = (32, (2, 2, 2, 2), (2, 2, 4, 4), 7)  # embed dim, depths, heads, window


def native_spec(tmp_path, family: str, backbone: str) -> str:
    """A random-weights ``family`` checkpoint with ``backbone`` written under ``tmp_path``, and its
    spec (the shapes labels, images resized to 128..192 as the demo's)."""
    from mfcache.detectors.native import FAMILIES
    from mfcache.detectors.native.checkpoint import random_state_dict

    options = {**NATIVE_TINY, "backbone": backbone}
    if family == "hdetr":
        options["num_queries_one2many"] = 10
    config_cls, model_cls = FAMILIES[family]
    model = model_cls(config_cls(**options, num_classes=1 + len(CATEGORIES)))
    state = random_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed=4)
    # Swin's relative position index is a table of indices the originals store, not a weight
    state.update({k: v for k, v in model.state_dict().items() if k.endswith("relative_position_index")})
    torch.save({"model": state}, tmp_path / "native.pth")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["N/A", *CATEGORIES]))  # index = shapes category id
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{family}:{tmp_path / 'native.pth'}?{query}&labels={labels}&shortest_edge=128&longest_edge=192"


@pytest.mark.parametrize("family,backbone", [("hdetr", "resnet18"), ("dino", "swin_micro")])
def test_native_detectors_recompute_the_c1_they_store(shapes_data, tmp_path, monkeypatch, family, backbone):
    """ResNet (stem + layer1) and Swin (patch embedding + stage 0) C1 programs, exported with
    dynamic sizes, re-make every image's stored map (float32 storage: the maps agree to float
    rounding, not only to float16's)."""
    from mfcache.detectors.native import swin

    monkeypatch.setitem(swin.SWINS, "swin_micro", SWIN_MICRO)
    detector = native_spec(tmp_path, family, backbone)
    splits = {}
    for c1 in ("store", "recompute"):
        extract(
            detector=detector,
            images=shapes_data / "val",
            annotations=shapes_data / "annotations" / "val.json",
            out=tmp_path / c1,
            config=ExtractConfig(c1=c1, topk=10, batch_size=1, num_workers=0, device="cpu", dtype="float32"),
            progress=False,
        )
        splits[c1] = Cache(tmp_path / c1).split("val")
    stored, recomputed = splits["store"], splits["recompute"]
    assert "c1" in stored.group and "c1" not in recomputed.group
    assert STEM_ARRAY in Cache(tmp_path / "recompute").root
    sizes = set()
    for i in range(recomputed.num_rows):
        a = stored.read(i, levels=(0,), targets=False).c1
        b = recomputed.read(i, levels=(0,), targets=False).c1
        assert a.shape == b.shape and a.shape[0] == (64 if backbone == "resnet18" else SWIN_MICRO[0])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        sizes.add(tuple(a.shape[1:]))
    assert len(sizes) > 1  # one program, several image sizes


# ----------------------------------------------------------------------------- --c1 auto
def test_auto_policy_resolves_once_and_is_never_fingerprinted():
    from mfcache.cache.c1_stem import resolve_c1

    assert resolve_c1("auto", can_recompute=True, existing=None) == "recompute"
    assert resolve_c1("auto", can_recompute=False, existing=None) == "store"
    assert resolve_c1("auto", can_recompute=True, existing="store") == "store"  # a cache keeps its policy
    assert resolve_c1("store", can_recompute=True, existing=None) == "store"
    assert resolve_c1("none", can_recompute=True, existing="recompute") == "none"  # the fingerprint then refuses it


def test_auto_recomputes_for_the_demo_and_keeps_an_existing_caches_policy(shapes_data, tmp_path, capsys):
    args = dict(detector="demo", images=shapes_data / "val", annotations=shapes_data / "annotations" / "val.json")
    auto = ExtractConfig(num_workers=0, device="cpu")
    assert auto.c1 == "auto"
    summary = extract(**args, out=tmp_path / "auto", config=auto, progress=True)
    assert summary.c1 == "recompute" and "C1 recomputed from the images, --c1 auto" in capsys.readouterr().err
    assert Cache(tmp_path / "auto").fingerprint["extract"]["c1"] == "recompute"
    assert STEM_ARRAY in Cache(tmp_path / "auto").root and "c1" not in Cache(tmp_path / "auto").split("val").group

    store = extract(
        **args, out=tmp_path / "store", config=ExtractConfig(c1="store", num_workers=0, device="cpu"), progress=False
    )
    again = extract(**args, out=tmp_path / "store", config=auto, progress=False)  # e.g. a cache from before auto
    assert (store.c1, again.c1, again.written) == ("store", "store", 0)
    assert Cache(tmp_path / "store").fingerprint["extract"]["c1"] == "store"
    with pytest.raises(MfcacheError, match="c1='store' .asked for 'recompute'"):
        extract(
            **args,
            out=tmp_path / "store",
            config=ExtractConfig(c1="recompute", num_workers=0, device="cpu"),
            progress=False,
        )
