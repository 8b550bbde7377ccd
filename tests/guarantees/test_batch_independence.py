"""Batch independence (design §7, docs/design.md): an image's mask logits, training loss, eval results and
predictions never depend on its batch mates or the batch size.

Head inputs are built directly (as the cache reader serves one image: maps cropped to the
image's valid levels) and batched with :meth:`Batch.collate`, which zero-pads them."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcache.cache.sample import Batch, Sample
from mfcache.config import TrainConfig, preset_names, resolve_run_config
from mfcache.heads import build_head
from mfcache.ops.losses import head_loss, resize_targets
from mfcache.stages.postprocess import run_head
from tests.helpers.cli import run_ok

D, C1, LEVELS, K = 32, 8, 4, 3
STRIDES = tuple(8 * 2**l for l in range(LEVELS))
_heads: dict[str, torch.nn.Module] = {}


def head_of(preset: str) -> torch.nn.Module:
    """The preset's head at the test's sizes, built once with fixed weights."""
    if preset not in _heads:
        torch.manual_seed(0)
        config = resolve_run_config(preset).head
        _heads[preset] = build_head(config, d_model=D, c1_channels=C1, num_levels=LEVELS)
    return _heads[preset]


def sample(height: int, width: int, seed: int, levels: tuple[int, ...]) -> Sample:
    """One image of ``height x width`` input px as the reader serves it: K queries, boxes
    xyxy input px (some crossing or touching the border), the head's levels ``[D, h_l, w_l]``
    and ``c1 [C1, h/4, w/4]`` at the image's valid sizes, random targets ``[K, 16, 16]``."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float32)
    lo = (torch.rand(K, 2, generator=gen) * 1.2 - 0.1) * size
    hi = torch.minimum(lo + 2 + torch.rand(K, 2, generator=gen) * size, size * 1.05)
    queries = torch.randn(K, D, generator=gen)
    boxes = torch.cat([lo, torch.maximum(hi, lo + 1)], -1)
    maps = [
        torch.randn(D, math.ceil(height / STRIDES[l]), math.ceil(width / STRIDES[l]), generator=gen) for l in levels
    ]
    c1 = torch.randn(C1, math.ceil(height / 4), math.ceil(width / 4), generator=gen)
    masks = torch.rand(K, 16, 16, generator=gen) > 0.5
    return Sample(
        image_id=seed,
        queries=queries,
        boxes=boxes,
        scores=torch.ones(K),
        labels=torch.zeros(K).long(),
        query_index=torch.arange(K),
        levels=maps,
        input_hw=torch.tensor([height, width]),
        orig_hw=torch.tensor([height, width]),
        c1=c1,
        gt_id=torch.arange(K),
        gt_iou=torch.ones(K),
        target_masks=masks,
    )


def run(head, batch: Batch, select: torch.Tensor | None = None):
    if not head.uses_c1:
        batch = dataclasses.replace(batch, c1=None, c1_hw=None)
    return run_head(head, batch, select)


def preset_loss(preset: str, out, targets: torch.Tensor) -> torch.Tensor:
    """The training loop's loss for this preset (:func:`head_loss`, unit weights). The point
    loss samples uniform points (importance 0), the same draws for the same rows: its top-k
    choice of uncertain points would let ulp-level differences swap points that tie in uncertainty."""
    config = dataclasses.replace(resolve_run_config(preset).head, points=64, importance=0.0, quality_weight=1.0)
    torch.manual_seed(1)
    return head_loss(out, resize_targets(targets, out.mask_logits.shape[-1]), config, TrainConfig())[0]


@st.composite
def images(draw):
    """(sizes in input px, position of the image under test): it, one image larger in both
    sides and one no larger in either, in random order."""
    h, w = draw(st.integers(8, 96)), draw(st.integers(8, 96))
    larger = (h + draw(st.integers(1, 40)), w + draw(st.integers(1, 40)))
    smaller = (draw(st.integers(8, h)), draw(st.integers(8, w)))
    sizes = [(h, w), larger, smaller]
    order = draw(st.permutations(range(3)))
    return [sizes[i] for i in order], order.index(0)


@pytest.mark.parametrize("preset", preset_names())
@settings(max_examples=5, deadline=None)
@given(case=images(), seed=st.integers(0, 1000))
def test_mask_logits_alone_equal_batched(preset, case, seed):
    sizes, at = case
    head = head_of(preset).eval()
    samples = [sample(h, w, seed + i, head.levels) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        batched = run(head, Batch.collate(samples))
        alone = run(head, Batch.collate([samples[at]]))
    rows = slice(at * K, (at + 1) * K)
    torch.testing.assert_close(batched.mask_logits[rows], alone.mask_logits, atol=1e-5, rtol=0)
    if alone.quality is not None:
        torch.testing.assert_close(batched.quality[rows], alone.quality, atol=1e-5, rtol=0)


TOKEN_PRESETS = [p for p in preset_names() if head_of(p).uses_tokens]


@pytest.mark.parametrize("preset", TOKEN_PRESETS)
def test_inference_runs_rois_one_image_at_a_time_with_the_batch_values(preset):
    """At inference a head with RoI tokens runs one image's boxes at a time (memory bounded by
    one image's detections): the values of the whole-batch pass training runs, and an
    image with no selected detection is skipped."""
    head = head_of(preset)
    samples = [sample(h, w, 7 + i, head.levels) for i, (h, w) in enumerate([(40, 56), (72, 24), (33, 90)])]
    select = torch.ones(3, K, dtype=torch.bool)
    select[1] = False  # the middle image has nothing to segment
    select[2, 1] = False
    calls = []
    hook = head.predictor.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    with torch.no_grad():
        whole = run(head.train(), Batch.collate(samples), select)
        per_image = run(head.eval(), Batch.collate(samples), select)
    hook.remove()
    assert calls == [2 * K - 1, K, K - 1]  # training: one pass; inference: one per image with detections
    assert per_image.mask_logits.shape == whole.mask_logits.shape
    torch.testing.assert_close(per_image.mask_logits, whole.mask_logits, atol=1e-5, rtol=0)
    if whole.quality is not None:
        torch.testing.assert_close(per_image.quality, whole.quality, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", preset_names())
@settings(max_examples=2, deadline=None)
@given(case=images(), seed=st.integers(0, 1000))
def test_training_loss_and_gradient_alone_equal_the_images_share(preset, case, seed):
    """The loop's loss is a mean over the batch's selected queries, i.e. the positives-weighted
    mean of per-image losses: each image's part (its rows of the batched forward) must equal
    the loss of the image trained alone, gradient included."""
    sizes, at = case
    head = head_of(preset).train()
    samples = [sample(h, w, seed + i, head.levels) for i, (h, w) in enumerate(sizes)]
    select = torch.rand(len(sizes), K, generator=torch.Generator().manual_seed(seed)) > 0.4
    select[at, 0] = True
    batch = Batch.collate(samples)
    rows = select[:at].sum().item() + torch.arange(select[at].sum().item())  # the image's rows among the N selected

    def loss_and_grads(out, index):
        loss = preset_loss(
            preset,
            type(out)(out.mask_logits[index], None if out.quality is None else out.quality[index]),
            samples[at].target_masks[select[at]],
        )
        grads = torch.autograd.grad(loss, [p for p in head.parameters()], allow_unused=True)
        return loss, grads

    shared, shared_grads = loss_and_grads(run(head, batch, select), rows)
    alone, alone_grads = loss_and_grads(run(head, Batch.collate([samples[at]]), select[at : at + 1]), slice(None))
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    for (name, _), a, b in zip(head.named_parameters(), shared_grads, alone_grads):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{preset} {name}: {m}")


# ----------------------------------------------------------------------------- eval and predict on a cache
_caches: dict[int, object] = {}


def cache_and_run(shapes_data, tmp_path_factory, batch_size: int):
    """The 4 val images (each its own size) extracted at detector batch ``batch_size``, and a
    head with the GroupNorm C1 neck (the part most sensitive to padding) trained 2 steps on
    them at batch 4; made once per batch size."""
    if batch_size not in _caches:
        root = tmp_path_factory.mktemp(f"batch{batch_size}")
        run_ok(
            "extract",
            "--detector",
            "demo",
            "--images",
            shapes_data / "val",
            "--annotations",
            shapes_data / "annotations" / "val.json",
            "--out",
            root / "cache",
            "--batch-size",
            batch_size,
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
            "--head",
            "neck_conv_gn",
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=4",
            "-q",
        )
        _caches[batch_size] = root
    return _caches[batch_size]


def test_eval_results_and_ap_do_not_depend_on_the_batch_size(shapes_data, tmp_path_factory):

    from mfcache.cache.reader import Cache
    from mfcache.metrics import coco_evaluate
    from mfcache.stages.evaluate import predict_split
    from mfcache.stages.runs import load_run

    cached = cache_and_run(shapes_data, tmp_path_factory, 1)
    data = Cache(cached / "cache").split("val")
    assert len({tuple(hw) for hw in data.index["input_hw"].tolist()}) == data.num_rows  # sizes all differ
    loaded = load_run(cached / "run", data.cache.fingerprint, torch.device("cpu"))
    head, config = loaded.head, loaded.config
    results, metrics = {}, {}
    for size in (1, 3, 4):
        sized = dataclasses.replace(config, eval=dataclasses.replace(config.eval, batch_size=size))
        results[size] = predict_split(head, sized, data, torch.device("cpu"), progress=False)["head"]
        metrics[size] = coco_evaluate(data.coco(), results[size])
    for size in (3, 4):
        assert results[size] == results[1]
        assert metrics[size]["segm"] == metrics[1]["segm"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_predict_on_cached_images_equals_eval(shapes_data, tmp_path_factory, tmp_path, batch_size):
    """``predict --batch-size n`` runs the detector on the batches an extraction at
    ``--batch-size n`` ran (the images in the same order), so its features are the cached
    ones bit for bit; the head then batches images its own way (eval at eval.batch_size 8)."""
    import json

    from mfcache.stages.evaluate import evaluate

    cached = cache_and_run(shapes_data, tmp_path_factory, batch_size)
    run_ok(
        "predict",
        "--detector",
        "demo",
        "--run",
        cached / "run",
        shapes_data / "val",
        "--out",
        tmp_path / "out",
        "--batch-size",
        batch_size,
        "-q",
    )
    captured = {}
    evaluate(
        cache_path=cached / "cache",
        run_dir=cached / "run",
        out=tmp_path / "metrics.json",
        progress=False,
        on_results=lambda split, results: captured.update(results=results),
    )
    files = sorted(p.name for p in (shapes_data / "val").glob("*.png"))  # predict numbers images 1..N in this order
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())
    id_of = {im["file_name"]: im["id"] for im in val["images"]}
    predicted = json.loads((tmp_path / "out" / "results.json").read_text())
    for number, name in enumerate(files, start=1):
        ours = [{**r, "image_id": None} for r in predicted if r["image_id"] == number]
        theirs = [{**r, "image_id": None} for r in captured["results"] if r["image_id"] == id_of[name]]
        assert ours and ours == theirs, name


@pytest.mark.parametrize("preset", ["box_baseline", "paper_final"])
def test_mask_logits_alone_equal_batched_on_torchvisions_roi_align(preset, monkeypatch):
    """The same guarantee when RoIAlign takes torchvision's path (the one large maps take): it
    runs image by image on each image's own map, as the dense path does."""
    import mfcache.heads.roi as roi

    monkeypatch.setattr(roi, "DENSE_MAX_PIXELS", 0)
    head = head_of(preset).eval()
    sizes = [(24, 32), (40, 36), (16, 24)]
    samples = [sample(h, w, 5 + i, head.levels) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        batched = run(head, Batch.collate(samples))
        for at in range(3):
            alone = run(head, Batch.collate([samples[at]]))
            rows = slice(at * K, (at + 1) * K)
            torch.testing.assert_close(batched.mask_logits[rows], alone.mask_logits, atol=1e-5, rtol=0)
            if alone.quality is not None:
                torch.testing.assert_close(batched.quality[rows], alone.quality, atol=1e-5, rtol=0)
