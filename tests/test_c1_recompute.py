"""--c1 recompute: C1 is not stored but re-made from the image, equal to the stored one."""

import pytest
import torch

import mfcache.detectors
from mfcache.cache.c1_stem import STEM_ARRAY
from mfcache.cache.reader import Cache
from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.stages.train import train
from mfcache.errors import MfcacheError
from mfcache.stages.extract import extract


def cache(shapes_data, out, c1):
    extract(detector="demo", images=shapes_data / "train", annotations=shapes_data / "annotations" / "train.json",
            out=out, config=ExtractConfig(c1=c1, batch_size=1, num_workers=0, device="cpu"), progress=False)
    return Cache(out).split("train")


def test_recomputed_c1_equals_the_stored_one_and_training_never_loads_the_detector(shapes_data, tmp_path,
                                                                                  monkeypatch):
    stored = cache(shapes_data, tmp_path / "stored", "store")
    recomputed = cache(shapes_data, tmp_path / "recompute", "recompute")
    assert "c1" not in recomputed.group and STEM_ARRAY in Cache(tmp_path / "recompute").root
    for i in range(recomputed.num_images):  # the stored stem runs: this user's extraction exported it
        a = stored.read(i, levels=(0,), targets=False).c1.float()
        b = recomputed.read(i, levels=(0,), targets=False).c1
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-3)  # the stored map is fp16

    def no_detector(*args, **kwargs):
        raise AssertionError("training loaded the detector")

    monkeypatch.setattr(mfcache.detectors, "load_detector", no_detector)
    last = train(cache_path=tmp_path / "recompute", run_dir=tmp_path / "run", progress=False,
                 config=resolve_run_config("box_baseline", ["train.steps=2", "train.batch_size=2",
                                                            "train.min_iou=0.0", "train.num_workers=0"]))
    assert last["step"] == 2


def test_a_moved_image_folder_is_a_clear_error(shapes_data, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(shapes_data / "train", images)
    extract(detector="demo", images=images, annotations=shapes_data / "annotations" / "train.json",
            out=tmp_path / "c", config=ExtractConfig(c1="recompute", num_workers=0, device="cpu"), progress=False)
    shutil.rmtree(images)
    with pytest.raises(MfcacheError, match="is gone"):
        Cache(tmp_path / "c").split("train").read(0)
