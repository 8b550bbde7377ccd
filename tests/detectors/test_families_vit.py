"""LW-DETR and RF-DETR (ViT backbones, no transformer encoder), checked against the model
itself as tests/detectors/test_families.py checks the other families: a tiny random model is saved with
its processor, loaded through ``hf:<dir>``, and the adapter's outputs are compared with the
model's own outputs, its projector maps (the memory its decoder attends to) and its
processor's ``post_process_object_detection``; then extract -> train 1 step -> evaluate."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from mfcache.config import ExtractConfig, HeadConfig, resolve_run_config
from mfcache.data.transforms import to_input
from mfcache.detectors import load_detector
from mfcache.detectors.base import IMAGENET_MEAN, IMAGENET_STD, level_shapes, select_topk
from mfcache.errors import MfcacheError
from tests.helpers.families import LABELS, family_batch, save_family

transformers = pytest.importorskip("transformers")
T = transformers


def _lw_config(scales=(2.0, 0.5)):
    # patch 16, 2x2 windows: inputs must be multiples of 32; levels at strides 8 and 32
    vit = T.LwDetrViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        pretrain_image_size=32,
        patch_size=16,
        window_block_indices=[0],
        out_indices=[1, 2],
        num_windows=4,
    )
    return T.LwDetrConfig(
        backbone_config=vit,
        projector_scale_factors=list(scales),
        d_model=32,
        decoder_layers=2,
        decoder_ffn_dim=64,
        decoder_self_attention_heads=2,
        decoder_cross_attention_heads=4,
        num_queries=10,
        group_detr=2,
        c2f_num_blocks=1,
        **LABELS,
    )


def _rf_config():
    # patch 14, 2 windows per side: inputs must be multiples of 28; one level at stride 14
    vit = T.RfDetrDinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        out_indices=[1, 2],
        num_windows=2,
    )
    return T.RfDetrConfig(
        backbone_config=vit,
        d_model=32,
        decoder_layers=2,
        decoder_ffn_dim=64,
        decoder_self_attention_heads=2,
        decoder_cross_attention_heads=4,
        num_queries=10,
        group_detr=2,
        c2f_num_blocks=1,
        intermediate_size=64,
        **LABELS,
    )


def _memory_lw(model, pv):
    """The projector maps (the decoder's ``encoder_hidden_states``), flattened and concatenated."""
    inner = model.model
    maps = inner.backbone.projector(inner.backbone.backbone(pv).feature_maps)
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def _memory_rf(model, pv):
    inner = model.model if isinstance(model, T.RfDetrForObjectDetection) else model.model.model
    return inner.backbone.projector(inner.backbone.backbone(pv).feature_maps).flatten(2).transpose(1, 2)


@dataclass
class Family:
    name: str  # config.json's model_type
    build: Callable[[], torch.nn.Module]
    processor: Callable[[], object]
    expected_memory: Callable
    strides: tuple[int, ...]
    size: int  # the fixed (square) input size
    resize: str  # the pixel path that equals the processor's
    pad_divisor: int


FAMILIES = {
    "lw_detr": Family(
        "lw_detr",
        lambda: T.LwDetrForObjectDetection(_lw_config()),
        lambda: T.DeformableDetrImageProcessor(size={"height": 64, "width": 64}),
        _memory_lw,
        (8, 32),
        64,
        "processor",
        64,
    ),
    "lw_detr_one_level": Family(
        "lw_detr",
        lambda: T.LwDetrForObjectDetection(_lw_config((1.0,))),
        lambda: T.DeformableDetrImageProcessor(size={"height": 64, "width": 64}),
        _memory_lw,
        (16,),
        64,
        "processor",
        64,
    ),
    "rf_detr": Family(
        "rf_detr",
        lambda: T.RfDetrForObjectDetection(_rf_config()),
        lambda: T.RfDetrImageProcessor(size={"height": 56, "width": 56}),
        _memory_rf,
        (14,),
        56,
        "float-noaa",
        28,
    ),
    "rf_detr_segmentation": Family(
        "rf_detr",
        lambda: T.RfDetrForInstanceSegmentation(_rf_config()),
        lambda: T.RfDetrImageProcessor(size={"height": 56, "width": 56}),
        _memory_rf,
        (14,),
        56,
        "float-noaa",
        28,
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    return save_family(request.param, FAMILIES[request.param], tmp_path_factory)


def test_adapter_matches_the_model(saved):
    _, family, path, model = saved
    det = load_detector(f"hf:{path}")
    info = det.info
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family.name == info.family
    assert type(det.model) is type(model)  # the class config.json's architectures names
    assert (info.sigmoid, info.strides, info.c1_channels, info.d_model, info.num_queries) == (
        True,
        family.strides,
        0,
        32,
        10,
    )
    pre = info.preprocess
    assert (pre.fixed_size, pre.mean, pre.std, pre.resize, pre.pad_divisor) == (
        (family.size, family.size),
        IMAGENET_MEAN,
        IMAGENET_STD,
        family.resize,
        family.pad_divisor,
    )

    sizes = [(family.size, family.size)] * 2
    pv, pm = family_batch(sizes, pre.pad_divisor)
    out = det(pv, pm)
    with torch.no_grad():
        raw = model(pixel_values=pv, pixel_mask=pm.long())
        memory = family.expected_memory(model, pv)
    torch.testing.assert_close(out.queries, raw.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, raw.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.memory, memory, rtol=0, atol=1e-5)
    assert out.spatial_shapes.tolist() == [[family.size // s] * 2 for s in info.strides]
    for i, hw in enumerate(sizes):
        assert out.valid[i].tolist() == [list(x) for x in level_shapes(hw, info.strides)]
    assert out.c1 is None

    k = 10  # boxes: input pixels, equal to the processor's post-processing at the input size
    top = select_topk(out, k, sigmoid=True)
    processor = T.AutoImageProcessor.from_pretrained(path)
    ref = processor.post_process_object_detection(raw, threshold=-1.0, target_sizes=torch.tensor(sizes), top_k=k)
    for i, r in enumerate(ref):
        torch.testing.assert_close(top.scores[i], r["scores"], rtol=0, atol=1e-5)
        assert torch.equal(top.labels[i], r["labels"])
        torch.testing.assert_close(top.boxes[i], r["boxes"], rtol=0, atol=1e-4)


def test_pixels_equal_the_processor(saved):
    """The adapter's pixel path gives the checkpoint processor's pixel_values (any aspect ratio
    becomes the fixed size; RF-DETR's processor resizes the float image without antialiasing)."""
    _, family, path, _ = saved
    pre = load_detector(f"hf:{path}").info.preprocess
    processor = T.AutoImageProcessor.from_pretrained(path)
    rng = np.random.default_rng(0)
    for h, w in [(50, 90), (120, 70)]:  # one upscale, one mixed down/up
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        ours = to_input(image, pre)
        assert ours.shape == expected.shape == (3, family.size, family.size)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        if family.resize == "float-noaa":  # the antialiased float path is measurably different
            assert (to_input(image, replace(pre, resize="float")) - expected).abs().max() > 0.05


def test_variable_size_preprocessing_is_refused(tmp_path):
    """Padding changes a ViT's every token (no attention mask): a fixed input size is required."""
    torch.manual_seed(0)
    T.LwDetrForObjectDetection(_lw_config()).save_pretrained(tmp_path)
    T.DeformableDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(tmp_path)
    with pytest.raises(MfcacheError, match="must resize to a fixed size"):
        load_detector(f"hf:{tmp_path}")


@pytest.mark.parametrize(
    "stride, level_hw, fused_hw", [(14, (4, 4), (14, 14)), (32, (2, 3), (16, 24)), (8, (5, 7), (10, 14))]
)
def test_fused_map_is_at_stride_4_for_any_level_stride(stride, level_hw, fused_hw):
    """F is at stride 4 whatever the level's stride (RF-DETR's 14, DETR's 32), so boxes in input
    pixels land on it at scale 1/4."""
    from mfcache.heads import build_head

    head = build_head(HeadConfig(use_c1=False, neck="none"), d_model=16, c1_channels=0, num_levels=1, strides=(stride,))
    # a level whose channels 0 and 1 hold the input-pixel y and x of each cell's centre
    h, w = level_hw
    ys, xs = (torch.arange(h) + 0.5) * stride, (torch.arange(w) + 0.5) * stride
    level = torch.zeros(1, 16, h, w)
    level[0, 0], level[0, 1] = ys[:, None].expand(h, w), xs[None, :].expand(h, w)
    fused = head.fusion([level], None)[0]
    assert tuple(fused.shape[-2:]) == fused_hw
    # F's pixel (v, u) covers input pixels [4v, 4v + 4), centre 4v + 2: between the first and last
    # cell centres (bilinear upsampling is exact on a ramp there) F holds that very position
    fy, fx = (torch.arange(fused_hw[0]) + 0.5) * 4, (torch.arange(fused_hw[1]) + 0.5) * 4
    rows, cols = (fy >= ys[0]) & (fy <= ys[-1]), (fx >= xs[0]) & (fx <= xs[-1])
    assert rows.sum() >= 2 and cols.sum() >= 2
    inner = fused[:, rows][:, :, cols]
    torch.testing.assert_close(inner[0], fy[rows][:, None].expand(-1, int(cols.sum())))
    torch.testing.assert_close(inner[1], fx[cols][None, :].expand(int(rows.sum()), -1))


@pytest.mark.parametrize("saved", [k for k in FAMILIES if k != "lw_detr_one_level"], indirect=True)  # same plumbing
def test_extract_train_evaluate(saved, shapes, tmp_path):
    from mfcache.cache.reader import Cache
    from mfcache.stages.evaluate import evaluate
    from mfcache.stages.extract import extract
    from mfcache.stages.train import train

    _, family, path, _ = saved
    config = ExtractConfig(topk=10, target_size=8, block_size=2, num_workers=0, device="cpu")
    for split in ("train", "val"):
        summary = extract(
            detector=f"hf:{path}",
            images=shapes / split,
            annotations=shapes / "annotations" / f"{split}.json",
            out=tmp_path / "cache",
            config=config,
            progress=False,
        )
        assert summary.written == summary.num_rows
    cache = Cache(tmp_path / "cache")
    assert cache.detector.family == family.name and cache.detector.c1_channels == 0
    assert (cache.split("train").index["input_hw"] == family.size).all()
    basic = ["train.steps=1", "train.batch_size=2", "train.device=cpu", "train.min_iou=0"]
    with pytest.raises(MfcacheError, match="no C1 map .*ViT backbones"):  # the default head fuses C1
        train(
            cache_path=tmp_path / "cache",
            run_dir=tmp_path / "refused",
            config=resolve_run_config(None, basic),
            split="train",
            progress=False,
        )
    run = resolve_run_config(None, [*basic, "head.use_c1=false"])
    train(cache_path=tmp_path / "cache", run_dir=tmp_path / "run", config=run, split="train", progress=False)
    metrics = evaluate(
        cache_path=tmp_path / "cache", run_dir=tmp_path / "run", split="val", progress=False, device="cpu"
    )
    assert metrics["num_images"] == 2 and metrics["num_detections"] > 0
    assert metrics["detector"]["spec"] == f"hf:{path}"
