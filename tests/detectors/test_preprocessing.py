"""Preprocessing: by default the pixels of ``hf:`` detectors equal those of the checkpoint's
own transformers image processor; the float path stays available, is recorded in the
cache fingerprint, and caches from the two paths are never mixed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mfcache.cache.reader import Cache
from mfcache.cache.schema import fingerprint, fingerprint_mismatch
from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.data.transforms import pad_batch, to_input
from mfcache.detectors import load_detector
from mfcache.detectors.base import DetectorInfo
from mfcache.detectors.hf import ADAPTERS, read_preprocess
from mfcache.errors import MfcacheError
from mfcache.stages.extract import extract
from mfcache.stages.train import train

transformers = pytest.importorskip("transformers")
T = transformers

# Up- and downsampling, portrait and landscape, one image already at its input size
# (shortest edge 64) and one whose long side caps the resize.
SIZES = [(50, 70), (130, 90), (64, 81), (240, 60), (97, 203)]

PROCESSORS = {
    "deformable_detr": lambda: T.DeformableDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 100}),
    "deformable_detr_canvas": lambda: T.DeformableDetrImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 96}, pad_size={"height": 128, "width": 128}
    ),
    "deformable_detr_own_stats": lambda: T.DeformableDetrImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 100}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]
    ),
    "deformable_detr_no_rescale": lambda: T.DeformableDetrImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 100},
        do_rescale=False,
        image_mean=[120.0, 115.0, 100.0],
        image_std=[60.0, 58.0, 57.0],
    ),
    "detr": lambda: T.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 100}),
    "conditional_detr": lambda: T.ConditionalDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 100}),
    "rt_detr": lambda: T.RTDetrImageProcessor(size={"height": 96, "width": 96}),  # also D-FINE's, DEIMv2's
}
FAMILY = {
    "deformable_detr_canvas": "deformable_detr",
    "deformable_detr_own_stats": "deformable_detr",
    "deformable_detr_no_rescale": "deformable_detr",
}


def images(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in SIZES]


def mfcache_batch(pixels, preprocess, divisor):
    preprocess = replace(preprocess, pad_divisor=divisor)
    return pad_batch([to_input(x, preprocess) for x in pixels], preprocess)


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_pixels_equal_the_checkpoints_own_processor(name, tmp_path):
    """Resize rule, uint8 resampling, rescale, normalisation and padding as the processor that
    ``AutoImageProcessor`` loads for the checkpoint: bit-equal pixels and mask. mfcache pads to
    a multiple of the coarsest stride (the processor to the batch's largest image): same real
    pixels, zeros beyond; with ``pad_size`` the canvases are the same and so is everything."""
    PROCESSORS[name]().save_pretrained(tmp_path)
    family = FAMILY.get(name, name)
    preprocess = read_preprocess(tmp_path / "preprocessor_config.json", ADAPTERS[family].default_preprocess)
    assert preprocess.resize == "processor"
    own = T.AutoImageProcessor.from_pretrained(tmp_path)
    pixels = images()
    expected = own(pixels, return_tensors="pt")
    pv, pm = mfcache_batch(pixels, preprocess, 32)
    assert pv.dtype == expected["pixel_values"].dtype == torch.float32
    for b, x in enumerate(pixels):
        h, w = preprocess.input_size(*x.shape[1:])
        assert torch.equal(pv[b, :, :h, :w], expected["pixel_values"][b, :, :h, :w]), name
        assert not pv[b, :, h:].any() and not pv[b, :, :, w:].any()
        assert pm[b].sum() == h * w and pm[b, :h, :w].all()
        if "pixel_mask" in expected:
            assert torch.equal(pm[b, :h, :w], expected["pixel_mask"][b, :h, :w].bool())
    if preprocess.pad_size is not None:
        assert torch.equal(pv, expected["pixel_values"]) and torch.equal(pm, expected["pixel_mask"].bool())


def test_an_hf_checkpoint_uses_its_processors_pixels_and_the_float_path_stays_available(tmp_path):
    """End to end through ``load_detector``: the default is the processor's pixels, and
    ``resize="float"`` gives the float path (resize before rounding), recorded in the fingerprint."""
    backbone = T.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    torch.manual_seed(0)
    T.DeformableDetrForObjectDetection(
        T.DeformableDetrConfig(
            backbone_config=backbone,
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            num_queries=10,
            num_labels=2,
        )
    ).save_pretrained(tmp_path)
    PROCESSORS["deformable_detr_canvas"]().save_pretrained(tmp_path)
    pixels = images(1)
    expected = T.AutoImageProcessor.from_pretrained(tmp_path)(pixels, return_tensors="pt")

    exact = load_detector(f"hf:{tmp_path}")
    pv, pm = pad_batch([to_input(x, exact.info.preprocess) for x in pixels], exact.info.preprocess)
    assert exact.info.preprocess.resize == "processor"
    assert torch.equal(pv, expected["pixel_values"]) and torch.equal(pm, expected["pixel_mask"].bool())

    fast = load_detector(f"hf:{tmp_path}", resize="float")
    assert fast.info.preprocess == replace(exact.info.preprocess, resize="float")
    x = pixels[0]
    h, w = fast.info.preprocess.input_size(*x.shape[1:])
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    resized = F.interpolate(x.float()[None] / 255, size=(h, w), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(to_input(x, fast.info.preprocess), (resized - mean) / std, rtol=0, atol=1e-6)
    difference = (to_input(x, fast.info.preprocess) - to_input(x, exact.info.preprocess)).abs().max()
    assert 0 < difference <= 1 / 255 / 0.224 + 1e-4  # at most one grey level apart

    stored = fingerprint(fast.info, topk=10, target_size=8, c1="none", dtype="float16")
    assert stored["detector"]["preprocess"]["resize"] == "float"
    wanted = fingerprint(exact.info, topk=10, target_size=8, c1="none", dtype="float16")
    assert fingerprint_mismatch(stored, wanted) == "preprocessing resize='float' (asked for 'processor')"
    with pytest.raises(MfcacheError, match="resize must be processor or float"):
        load_detector(f"hf:{tmp_path}", resize="pil")


def test_unsupported_resampling_is_refused(tmp_path):
    T.DeformableDetrImageProcessor(resample=3).save_pretrained(tmp_path)  # bicubic
    with pytest.raises(MfcacheError, match="resample 3 is not supported"):
        read_preprocess(tmp_path / "preprocessor_config.json")


def test_the_demo_keeps_the_path_it_was_trained_on():
    """The demo detector was trained on the float path (demo_training's to_input), so that is
    its own preprocessing; the processor path is an option for it."""
    assert load_detector("demo").info.preprocess.resize == "float"
    assert load_detector("demo", resize="processor").info.preprocess.resize == "processor"


def test_caches_written_before_the_option_read_as_the_float_path():
    info = load_detector("demo").info
    legacy = fingerprint(info, topk=10, target_size=8, c1="none", dtype="float16")
    for key in ("resize", "rescale_factor"):
        del legacy["detector"]["preprocess"][key]
    assert fingerprint_mismatch(legacy, fingerprint(info, topk=10, target_size=8, c1="none", dtype="float16")) is None
    assert DetectorInfo.from_dict(legacy["detector"]).preprocess.resize == "float"


def subset(shapes_data, root, n=2):
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())
    keep = {im["id"] for im in val["images"][:n]}
    (root / "val.json").write_text(
        json.dumps(
            {
                **val,
                "images": val["images"][:n],
                "annotations": [a for a in val["annotations"] if a["image_id"] in keep],
            }
        )
    )
    return root / "val.json"


def run_extract(shapes_data, annotations, out, **options):
    return extract(
        detector="demo",
        images=shapes_data / "val",
        annotations=annotations,
        out=out,
        config=ExtractConfig(topk=10, target_size=8, batch_size=1, num_workers=0, device="cpu", **options),
        progress=False,
    )


def test_a_cache_made_on_one_path_is_refused_for_the_other(shapes_data, tmp_path):
    annotations = subset(shapes_data, tmp_path)
    run_extract(shapes_data, annotations, tmp_path / "cache", c1="none")
    assert Cache(tmp_path / "cache").detector.preprocess.resize == "float"  # the demo's own
    with pytest.raises(MfcacheError, match=r"made with preprocessing resize='float' \(asked for 'processor'\)"):
        run_extract(shapes_data, annotations, tmp_path / "cache", c1="none", resize="processor")
    run_extract(shapes_data, annotations, tmp_path / "cache", c1="none", resize="float")  # the same: resumes
    with pytest.raises(
        MfcacheError, match="`extract.resize` must be one of auto, processor, float, float-noaa, got 'fast'"
    ):
        run_extract(shapes_data, annotations, tmp_path / "other", resize="fast")


def test_recomputed_c1_follows_the_caches_path(shapes_data, tmp_path):
    """``--c1 recompute`` preprocesses the image as extraction did, on the cache's path."""
    annotations = subset(shapes_data, tmp_path)
    run_extract(shapes_data, annotations, tmp_path / "stored", c1="store", resize="processor", dtype="float32")
    run_extract(shapes_data, annotations, tmp_path / "again", c1="recompute", resize="processor")
    stored, again = Cache(tmp_path / "stored").split("val"), Cache(tmp_path / "again").split("val")
    assert Cache(tmp_path / "again").detector.preprocess.resize == "processor"
    for i in range(again.num_rows):
        torch.testing.assert_close(
            again.read(i, levels=(0,), targets=False).c1,
            stored.read(i, levels=(0,), targets=False).c1,
            rtol=1e-5,
            atol=1e-5,
        )


def test_predict_uses_the_path_of_the_runs_cache(shapes_data, tmp_path, monkeypatch):
    """A head trained on a cache made on the processor path (not the demo's default)
    predicts on that path: the detector outputs it learned from."""
    import mfcache.stages.predict

    annotations = subset(shapes_data, tmp_path)
    run_extract(shapes_data, annotations, tmp_path / "cache", resize="processor")
    train(
        cache_path=tmp_path / "cache",
        run_dir=tmp_path / "run",
        progress=False,
        config=resolve_run_config(
            "box_baseline", ["train.steps=1", "train.batch_size=2", "train.min_iou=0.0", "train.num_workers=0"]
        ),
    )
    asked = []

    def spy(spec, **kwargs):
        asked.append(kwargs.get("resize"))
        return load_detector(spec, **kwargs)

    monkeypatch.setattr(mfcache.stages.predict, "load_detector", spy)
    image = sorted((shapes_data / "val").glob("*.png"))[0]
    summary = mfcache.stages.predict.predict_images(
        detector="demo", run_dir=tmp_path / "run", inputs=[image], out=tmp_path / "pred", device="cpu", progress=False
    )
    assert asked == ["processor"] and summary.num_images == 1
