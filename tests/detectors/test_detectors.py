"""Detector adapters: the transformers Deformable DETR adapter against the model's own
outputs and post-processing, the spec registry, and the demo detector."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from mfcache.detectors import load_detector
from mfcache.detectors.base import DetectorOutput, Preprocess, level_shapes, select_topk
from mfcache.errors import MfcacheError
from tests.helpers import batches

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DeformableDetrImageProcessor,
    ResNetConfig,
)

VARIANTS = {
    "plain": dict(with_box_refine=False, two_stage=False),
    "box_refine": dict(with_box_refine=True, two_stage=False),
    "two_stage": dict(with_box_refine=True, two_stage=True, two_stage_num_proposals=16),
}
INPUT_HW = [(100, 150), (120, 70)]  # not multiples of any stride: exercises the ceil rule
PAD = 64


def tiny_config(**kw) -> DeformableDetrConfig:
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    return DeformableDetrConfig(
        backbone_config=backbone,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_feature_levels=4,
        num_queries=20,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
        **kw,
    )


def save_tiny(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(tiny_config(**kw)).eval()
    model.save_pretrained(path)
    return path


def padded_batch(sizes, seed=0):
    return batches.padded_batch(sizes, PAD, seed=seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return request.param, path


@pytest.fixture(scope="module")
def run(saved):
    """(variant, path, detector, raw model, inputs, adapter output, raw output)."""
    variant, path = saved
    det = load_detector(f"hf:{path}")
    raw_model = DeformableDetrForObjectDetection.from_pretrained(path).eval()
    pv, pm = padded_batch(INPUT_HW)
    out = det(pv, pm)
    with torch.no_grad():
        raw = raw_model(pixel_values=pv, pixel_mask=pm.long())
    return variant, path, det, pv, pm, out, raw


def test_outputs_match_the_model(run):
    variant, _, det, pv, pm, out, raw = run
    assert isinstance(out, DetectorOutput)
    q = det.info.num_queries
    assert q == (16 if variant == "two_stage" else 20)
    assert out.queries.shape == (2, q, 32) and out.logits.shape == (2, q, 3) and out.boxes.shape == (2, q, 4)
    torch.testing.assert_close(out.queries, raw.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, raw.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.memory, raw.encoder_last_hidden_state, rtol=0, atol=1e-5)
    for t in (out.queries, out.logits, out.boxes, out.memory, out.c1):
        assert not t.requires_grad


def test_topk_matches_post_processing(run):
    _, _, det, pv, pm, out, raw = run
    k = 10
    top = select_topk(out, k, sigmoid=det.info.sigmoid)
    ref = DeformableDetrImageProcessor().post_process_object_detection(
        raw, threshold=-1.0, target_sizes=torch.tensor(INPUT_HW), top_k=k
    )
    for i, r in enumerate(ref):
        assert len(r["scores"]) == k
        torch.testing.assert_close(top.scores[i], r["scores"], rtol=0, atol=1e-5)
        assert torch.equal(top.labels[i], r["labels"])
        torch.testing.assert_close(top.boxes[i], r["boxes"], rtol=0, atol=1e-4)
        # the kept query index points back at the right query
        torch.testing.assert_close(top.queries[i], out.queries[i, top.query_index[i]])


def test_levels_valid_and_c1(run):
    _, _, det, pv, pm, out, _ = run
    info = det.info
    assert info.strides == (8, 16, 32, 64)
    assert info.family == "deformable_detr" and info.sigmoid and info.d_model == 32
    assert info.label_names == ("a", "b", "c")
    height, width = pv.shape[-2:]
    assert out.spatial_shapes.tolist() == [[height // s, width // s] for s in info.strides]
    assert int(out.spatial_shapes.prod(1).sum()) == out.memory.shape[1]
    for i, hw in enumerate(INPUT_HW):
        assert out.valid[i].tolist() == [list(x) for x in level_shapes(hw, info.strides)]
    assert info.c1_channels == 8
    assert out.c1.shape == (2, 8, height // 4, width // 4)


def test_strides_probe_agrees_with_config(run):
    _, _, det, *_ = run
    strides, c1_channels, c1_stride = det._probe()
    assert strides == [8, 16, 32] and c1_channels == 8 and c1_stride == 4


def test_frozen_and_hooks_fresh_per_call(run):
    _, _, det, *_ = run
    det.train()
    assert not det.model.training
    assert not any(p.requires_grad for p in det.parameters())
    pv, pm = padded_batch([(64, 128)])
    out = det(pv, pm)
    assert out.spatial_shapes.tolist() == [[8, 16], [4, 8], [2, 4], [1, 2]]
    assert out.valid.tolist() == [[[8, 16], [4, 8], [2, 4], [1, 2]]]
    assert out.c1.shape[-2:] == (16, 32) and not det._stash


def test_weights_hash_and_preprocessor(saved, tmp_path):
    _, path = saved
    det = load_detector(f"hf:{path}")
    assert det.info.weights_sha256 == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert det.info.preprocess == Preprocess()
    assert det.info.spec == f"hf:{path}" and det.info.trained
    own = save_tiny(tmp_path / "m")
    DeformableDetrImageProcessor(
        size={"shortest_edge": 320, "longest_edge": 480}, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]
    ).save_pretrained(own)
    pre = load_detector(f"hf:{own}").info.preprocess
    assert (pre.shortest_edge, pre.longest_edge, pre.mean, pre.std) == (320, 480, (0.5,) * 3, (0.25,) * 3)
    assert pre.pad_size is None
    DeformableDetrImageProcessor(
        size={"shortest_edge": 320, "longest_edge": 480}, pad_size={"height": 480, "width": 480}
    ).save_pretrained(own)
    assert load_detector(f"hf:{own}").info.preprocess.pad_size == (480, 480)


def test_pad_size_makes_outputs_independent_of_batch_mates():
    from mfcache.data.transforms import pad_batch
    from mfcache.detectors.demo import DEMO_PREPROCESS

    det = load_detector("demo")
    assert det.info.preprocess.pad_size == (192, 192) == DEMO_PREPROCESS.pad_size
    g = torch.Generator().manual_seed(0)
    small, tall = torch.randn(3, 128, 150, generator=g), torch.randn(3, 192, 128, generator=g)
    alone = det(*pad_batch([small], det.info.preprocess))
    together = det(*pad_batch([small, tall], det.info.preprocess))
    assert pad_batch([small], det.info.preprocess)[0].shape[-2:] == (192, 192)
    torch.testing.assert_close(alone.boxes[0], together.boxes[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone.logits[0], together.logits[0], atol=1e-4, rtol=1e-4)


def test_load_errors(tmp_path):
    with pytest.raises(MfcacheError, match="not found"):
        load_detector(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(MfcacheError, match="config.json"):
        load_detector(f"hf:{tmp_path}")
    other = save_tiny(tmp_path / "detr")
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "yolos"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MfcacheError, match=r"'yolos' is not supported; supported: conditional_detr, .*deformable_detr"):
        load_detector(f"hf:{other}")
    with pytest.raises(MfcacheError, match=r"valid forms: hf:<local dir or hub id>, demo"):
        load_detector("yolo:foo")
    with pytest.raises(MfcacheError):
        load_detector("hf:")
    with pytest.raises(MfcacheError):
        load_detector("demo:x")


def test_demo_detector(tmp_path):
    from mfcache.data.shapes import CATEGORIES
    from mfcache.detectors.demo import DEMO_PREPROCESS, DEMO_QUERIES, load_demo

    assert load_detector("demo").info == load_detector("demo").info
    a = load_demo(tmp_path)  # no weights there: the seed-0 architecture
    assert a.info.spec == "demo" and a.info.family == "deformable_detr"
    assert a.info.label_names == tuple(CATEGORIES)
    assert a.info.strides == (8, 16, 32, 64) and a.info.c1_channels == 32 and a.info.d_model == 128
    assert a.info.num_queries == DEMO_QUERIES and a.info.preprocess == DEMO_PREPROCESS
    assert a.info.trained is False
    pv, pm = padded_batch([(256, 320), (192, 256)])
    out = a(pv, pm)
    q = DEMO_QUERIES
    assert out.queries.shape == (2, q, 128) and out.logits.shape == (2, q, len(CATEGORIES))
    assert out.c1.shape == (2, 32, 64, 80)
    assert out.valid[1].tolist() == [list(x) for x in level_shapes((192, 256), a.info.strides)]


def test_detectors_package_is_light():
    code = "import sys, mfcache.detectors; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
