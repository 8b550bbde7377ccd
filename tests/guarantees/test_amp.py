"""Mixed precision (``extract --amp``, ``train.amp``, ``eval.amp``) on the CPU, where bfloat16
autocast works too: outputs stay within stated tolerances of float32, and a run records its
choice (a cache's in its fingerprint, a run's in its config)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mfcache.cache.sample import Batch
from mfcache.config import preset_names, resolve_run_config
from mfcache.heads import build_head
from mfcache.runtime import autocast
from mfcache.stages.postprocess import mask_probs

D, C1, LEVELS, K = 32, 8, 4, 6


def batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(2, K, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + 8 + torch.rand(2, K, 2, generator=gen) * 40], -1)
    levels = [torch.randn(2, D, 64 // s, 96 // s, generator=gen) for s in (8, 16, 32, 64)]
    return Batch(
        image_id=[0, 1],
        queries=torch.randn(2, K, D, generator=gen),
        boxes=boxes,
        scores=torch.ones(2, K),
        labels=torch.zeros(2, K, dtype=torch.long),
        query_index=torch.arange(K).expand(2, K),
        levels=levels,
        level_hw=torch.tensor([m.shape[-2:] for m in levels]).expand(2, -1, -1),
        input_hw=torch.tensor([[64, 96]] * 2),
        orig_hw=torch.tensor([[64, 96]] * 2),
        c1=torch.randn(2, C1, 16, 24, generator=gen),
        c1_hw=torch.tensor([[16, 24]] * 2),
    )


@pytest.mark.parametrize("preset", preset_names())
def test_head_mask_probabilities_under_bf16_stay_within_0_03_of_float32(preset):
    torch.manual_seed(0)
    config = resolve_run_config(preset).head
    head = build_head(config, d_model=D, c1_channels=C1, num_levels=LEVELS).eval()
    x = batch()
    x = dataclasses.replace(x, levels=[x.levels[l] for l in head.levels])
    with torch.no_grad():
        full, full_quality = mask_probs(head, x)
        half, half_quality = mask_probs(head, x, amp="bf16")
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.03, preset  # probabilities: bf16 keeps ~3 significant digits
    if full_quality is not None:
        assert (half_quality - full_quality).abs().max() < 0.03


def test_autocast_off_is_float32():
    with autocast(torch.device("cpu"), "off"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_demo_detector_under_bf16_stays_close():
    from mfcache.detectors import load_detector, run_detector
    from mfcache.detectors.base import select_topk

    det = load_detector("demo")
    inputs = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    full = run_detector(det, inputs, device=torch.device("cpu"))
    half = run_detector(det, inputs, device=torch.device("cpu"), amp="bf16")
    for key in ("memory", "c1"):  # the encoder and the backbone
        a, b = getattr(half, key), getattr(full, key)
        assert a.dtype == torch.float32 and (a - b).norm() / b.norm() < 0.02, key
    # two-stage: the decoder's queries start from the encoder's top proposals, and bf16 rounding
    # reorders near-ties among them, so some detections differ; most of the top 20 are the same
    top_full, top_half = (select_topk(out, 20, sigmoid=True) for out in (full, half))
    for i in range(2):
        a, b = ({(q, l) for q, l in zip(t.query_index[i].tolist(), t.labels[i].tolist())} for t in (top_full, top_half))
        assert len(a & b) >= 0.6 * len(a), (sorted(a), sorted(b))


@pytest.fixture(scope="module")
def bf16_cache(shapes_data, tmp_path_factory):
    """The shapes data extracted with the detector under bf16 autocast."""
    from mfcache.config import ExtractConfig
    from mfcache.stages.extract import extract

    cache = tmp_path_factory.mktemp("amp") / "cache"
    for split in ("train", "val"):
        extract(
            detector="demo",
            images=shapes_data / split,
            annotations=shapes_data / "annotations" / f"{split}.json",
            out=cache,
            config=ExtractConfig(num_workers=0, amp="bf16"),
            progress=False,
        )
    return cache


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_and_eval_under_amp(bf16_cache, tmp_path, amp):
    """A few steps with the head's forward under autocast: finite losses, the choice stored in
    the run's config (fp16 with a loss scale in the checkpoint); eval under autocast too."""
    from mfcache.checkpoint_io import load_checkpoint
    from mfcache.stages.evaluate import evaluate
    from mfcache.stages.train import train

    config = resolve_run_config(
        "blendmask",
        [
            "train.steps=3",
            "train.batch_size=2",
            "train.num_workers=0",
            "train.device=cpu",
            f"train.amp={amp}",
            f"eval.amp={amp}",
        ],
    )
    last = train(cache_path=bf16_cache, run_dir=tmp_path / "run", config=config, progress=False)
    assert last["step"] == 3 and last["loss"] is not None and last["loss"] == last["loss"]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt", what="run checkpoint")
    assert state["config"]["train"]["amp"] == amp and ("scaler" in state) == (amp == "fp16")
    assert state["fingerprint"]["extract"]["amp"] == "bf16"
    metrics = evaluate(cache_path=bf16_cache, run_dir=tmp_path / "run", progress=False, device="cpu")
    assert metrics["config"]["eval"]["amp"] == amp and metrics["segm"]["AP"] is not None


def test_a_cache_extracted_without_amp_refuses_to_continue_with_it(shapes_data, tmp_path):
    from mfcache.config import ExtractConfig
    from mfcache.errors import MfcacheError
    from mfcache.stages.extract import extract

    args = dict(
        detector="demo",
        images=shapes_data / "val",
        annotations=shapes_data / "annotations" / "val.json",
        out=tmp_path / "cache",
        progress=False,
    )
    extract(**args, config=ExtractConfig(num_workers=0))
    with pytest.raises(MfcacheError, match="amp='off' .asked for 'bf16'"):
        extract(**args, config=ExtractConfig(num_workers=0, amp="bf16"))


def test_eval_takes_eval_settings_only(tmp_path):
    from mfcache.errors import MfcacheError
    from mfcache.stages.evaluate import eval_config

    config = resolve_run_config("blendmask")
    assert eval_config(config, ["eval.amp=bf16", "eval.mask_threshold=0.4"]).eval.amp == "bf16"
    assert eval_config(config, None) is config
    with pytest.raises(MfcacheError, match="only `overrides` eval"):
        eval_config(config, ["train.lr=0.1"])
