"""Every supported transformers DETR family, checked against the model itself: a tiny
random-weight model per family is saved, loaded through ``hf:<dir>``, and its adapter's
outputs are compared with the model's own outputs and ``post_process_object_detection``;
then the whole pipeline (extract -> train 1 step -> evaluate) runs on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.data.shapes import CATEGORIES
from mfcache.detectors import load_detector
from mfcache.detectors.base import Preprocess, level_shapes, select_topk
from tests.helpers.families import LABELS, family_batch, save_family

transformers = pytest.importorskip("transformers")
T = transformers

DETR_SIZES = [(70, 100), (96, 64)]  # unpadded inputs; not multiples of 32: exercises the ceil rule
FIXED = (64, 64)  # RT-DETR-family input size


def _resnet(cls=T.ResNetConfig, out=("stage4",)):
    return cls(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=list(out),
    )


def _hgnet():
    return T.HGNetV2Config(
        embedding_size=8,
        hidden_sizes=[16, 32, 48, 64],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32, 48],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 32, 48, 64],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 3, 3],
        out_features=["stage2", "stage3", "stage4"],
    )


def _detr_kw(**kw):
    return dict(
        backbone_config=_resnet(),
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=10,
        **LABELS,
        **kw,
    )


def _rt_kw(backbone, channels):
    # RT-DETRv2 / D-FINE / DEIMv2 tie their per-layer heads to layer 0: they need two decoder layers
    return dict(
        backbone_config=backbone,
        encoder_hidden_dim=32,
        encoder_in_channels=channels,
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=4,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        decoder_layers=2,
        decoder_ffn_dim=64,
        decoder_attention_heads=4,
        num_queries=10,
        num_denoising=0,
        **LABELS,
    )


def _expected_memory_single(model, raw, pv, pm):
    """The encoder output; DAB-DETR hands it out only with output_hidden_states."""
    with torch.no_grad():
        return model(pixel_values=pv, pixel_mask=pm.long(), output_hidden_states=True).encoder_last_hidden_state


def _expected_memory_rt(model, raw, pv, pm):
    """The encoder's list of maps, each through the model's decoder_input_proj, flattened."""
    with torch.no_grad():
        maps = [proj(m) for proj, m in zip(model.model.decoder_input_proj, raw.encoder_last_hidden_state)]
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def _post_detr(raw, sizes, k):
    # softmax: every query, in query order; mfcache ranks them by score
    return T.DetrImageProcessor().post_process_object_detection(raw, threshold=-1.0, target_sizes=sizes)


def _post_conditional(raw, sizes, k):
    return T.ConditionalDetrImageProcessor().post_process_object_detection(
        raw, threshold=-1.0, target_sizes=sizes, top_k=k
    )


def _post_rt(raw, sizes, k):
    return T.RTDetrImageProcessor().post_process_object_detection(raw, threshold=-1.0, target_sizes=sizes)


@dataclass
class Family:
    build: Callable[[], torch.nn.Module]
    processor: Callable[[], object]  # saved next to the model: its preprocessing
    expected_memory: Callable
    post_process: Callable
    sigmoid: bool
    strides: tuple[int, ...]
    c1_channels: int
    fixed: bool  # RT-DETR-style fixed-size input


_DETR_PROCESSOR = dict(size={"shortest_edge": 64, "longest_edge": 100})
FAMILIES = {
    "detr": Family(
        lambda: T.DetrForObjectDetection(T.DetrConfig(**_detr_kw(d_model=32))),
        lambda: T.DetrImageProcessor(**_DETR_PROCESSOR),
        _expected_memory_single,
        _post_detr,
        False,
        (32,),
        16,
        False,
    ),
    "conditional_detr": Family(
        lambda: T.ConditionalDetrForObjectDetection(T.ConditionalDetrConfig(**_detr_kw(d_model=32))),
        lambda: T.ConditionalDetrImageProcessor(**_DETR_PROCESSOR),
        _expected_memory_single,
        _post_conditional,
        True,
        (32,),
        16,
        False,
    ),
    "dab-detr": Family(
        lambda: T.DabDetrForObjectDetection(T.DabDetrConfig(**_detr_kw(hidden_size=32))),
        lambda: T.ConditionalDetrImageProcessor(**_DETR_PROCESSOR),
        _expected_memory_single,
        _post_conditional,
        True,
        (32,),
        16,
        False,
    ),
    "rt_detr": Family(
        lambda: T.RTDetrForObjectDetection(
            T.RTDetrConfig(**_rt_kw(_resnet(T.RTDetrResNetConfig, ("stage2", "stage3", "stage4")), [32, 64, 64]))
        ),
        lambda: T.RTDetrImageProcessor(size={"height": FIXED[0], "width": FIXED[1]}),
        _expected_memory_rt,
        _post_rt,
        True,
        (8, 16, 32),
        16,
        True,
    ),
    "rt_detr_v2": Family(
        lambda: T.RTDetrV2ForObjectDetection(
            T.RTDetrV2Config(**_rt_kw(_resnet(T.RTDetrResNetConfig, ("stage2", "stage3", "stage4")), [32, 64, 64]))
        ),
        lambda: T.RTDetrImageProcessor(size={"height": FIXED[0], "width": FIXED[1]}),
        _expected_memory_rt,
        _post_rt,
        True,
        (8, 16, 32),
        16,
        True,
    ),
    "d_fine": Family(
        lambda: T.DFineForObjectDetection(T.DFineConfig(**_rt_kw(_hgnet(), [32, 48, 64]))),
        lambda: T.RTDetrImageProcessor(size={"height": FIXED[0], "width": FIXED[1]}),
        _expected_memory_rt,
        _post_rt,
        True,
        (8, 16, 32),
        16,
        True,
    ),
    "deimv2": Family(
        lambda: T.Deimv2ForObjectDetection(T.Deimv2Config(**_rt_kw(_hgnet(), [32, 48, 64]))),
        lambda: T.RTDetrImageProcessor(size={"height": FIXED[0], "width": FIXED[1]}),
        _expected_memory_rt,
        _post_rt,
        True,
        (8, 16, 32),
        16,
        True,
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    return save_family(request.param, FAMILIES[request.param], tmp_path_factory)


def test_adapter_matches_the_model(saved):
    name, family, path, model = saved  # the adapter loads the saved copy; compare with the original
    det = load_detector(f"hf:{path}")
    info = det.info
    assert json.loads((path / "config.json").read_text())["model_type"] == name == info.family
    assert (info.sigmoid, info.strides, info.c1_channels, info.d_model) == (
        family.sigmoid,
        family.strides,
        family.c1_channels,
        32,
    )
    assert info.label_names == CATEGORIES and info.num_queries == 10
    if family.fixed:
        assert info.preprocess == Preprocess(fixed_size=FIXED, mean=(0.0,) * 3, std=(1.0,) * 3)
        sizes = [FIXED, FIXED]
    else:
        assert (info.preprocess.shortest_edge, info.preprocess.longest_edge, info.preprocess.fixed_size) == (
            64,
            100,
            None,
        )
        sizes = DETR_SIZES
    pv, pm = family_batch(sizes, info.preprocess.pad_divisor)
    out = det(pv, pm)
    with torch.no_grad():
        raw = model(pixel_values=pv, pixel_mask=pm.long())

    torch.testing.assert_close(out.queries, raw.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, raw.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.memory, family.expected_memory(model, raw, pv, pm), rtol=0, atol=1e-5)

    # levels: the model's own shapes; valid = ceil(input / stride), as the cache plans them
    height, width = pv.shape[-2:]
    assert out.spatial_shapes.tolist() == [[height // s, width // s] for s in info.strides]
    assert int(out.spatial_shapes.prod(1).sum()) == out.memory.shape[1]
    for i, hw in enumerate(sizes):
        assert out.valid[i].tolist() == [list(x) for x in level_shapes(hw, info.strides)]
    if family.fixed:  # any aspect ratio becomes the fixed size
        assert info.preprocess.input_size(300, 200) == info.preprocess.input_size(50, 90) == FIXED
    assert out.c1.shape == (2, family.c1_channels, height // 4, width // 4)

    # top-k equals the model's own post-processing (boxes in input pixels)
    k = 10
    top = select_topk(out, k, sigmoid=info.sigmoid)
    ref = family.post_process(raw, torch.tensor(sizes), k)
    for i, r in enumerate(ref):
        order = torch.arange(k) if info.sigmoid else top.query_index[i].argsort()  # DETR's is in query order
        assert len(r["scores"]) == k
        torch.testing.assert_close(top.scores[i][order], r["scores"], rtol=0, atol=1e-5)
        assert torch.equal(top.labels[i][order], r["labels"])
        torch.testing.assert_close(top.boxes[i][order], r["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(top.queries[i], out.queries[i, top.query_index[i]])


def test_extract_train_evaluate(saved, shapes, tmp_path):
    from mfcache.cache.reader import Cache
    from mfcache.stages.evaluate import evaluate
    from mfcache.stages.extract import extract
    from mfcache.stages.train import train

    name, family, path, _ = saved
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
    assert cache.detector.family == name and cache.detector.sigmoid == family.sigmoid
    index = cache.split("train").index
    if family.fixed:
        assert (index["input_hw"] == FIXED).all()
    # random-weight detectors: no box overlaps a GT at the default 0.5 (training would refuse
    # the split); any overlap trains here, the test is about the plumbing of every family
    run = resolve_run_config(None, ["train.steps=1", "train.batch_size=2", "train.device=cpu", "train.min_iou=0"])
    train(cache_path=tmp_path / "cache", run_dir=tmp_path / "run", config=run, split="train", progress=False)
    metrics = evaluate(
        cache_path=tmp_path / "cache", run_dir=tmp_path / "run", split="val", progress=False, device="cpu"
    )
    assert metrics["num_images"] == 2
    assert metrics["detector"]["spec"] == f"hf:{path}" and metrics["num_detections"] > 0
    for kind in ("segm", "bbox"):
        assert 0.0 <= metrics[kind]["AP"] <= 1.0


def test_bf16_autocast_stays_close_to_float32(saved):
    """``extract --amp bf16``: the adapter under bfloat16 autocast gives float32 outputs within
    a few percent (relative RMS) of the float32 forward, boxes within 2% of the input size."""
    from mfcache.detectors import run_detector

    name, family, path, _ = saved
    det = load_detector(f"hf:{path}")
    sizes = [FIXED, FIXED] if family.fixed else DETR_SIZES
    inputs = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(sizes)]
    full = run_detector(det, inputs, device=torch.device("cpu"))
    half = run_detector(det, inputs, device=torch.device("cpu"), amp="bf16")
    for key in ("queries", "memory", "logits"):
        a, b = getattr(half, key), getattr(full, key)
        assert a.dtype == torch.float32
        assert (a - b).norm() / b.norm() < 0.05, (name, key)
    scale = max(max(s) for s in sizes)
    assert (half.boxes - full.boxes).abs().max() / scale < 0.02, name
