"""The demo detector's trainer: steps run, resume is exact, the export loads as a detector."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import DeformableDetrForObjectDetection

from mfcache.checkpoint_io import load_checkpoint
from mfcache.data.shapes import GENERATOR_VERSION, write_shapes_dataset
from mfcache.demo_detector.data import FlipStepBatches, ShapesTrainSet, category_to_label, read_split, read_targets
from mfcache.demo_detector.model import trainable_demo_model
from mfcache.demo_detector.train import (
    CHECKPOINT,
    EXPORT,
    LOG,
    DetectorTrainConfig,
    lr_factor,
    train_detector,
)
from mfcache.detectors import load_detector
from mfcache.detectors.demo import GENERATOR_FILE, TRAINING_FILE, check_generator, load_demo
from mfcache.errors import MfcacheError
from mfcache.stages.sampling import StepBatches


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_shapes")
    write_shapes_dataset(root, num_train=4, num_val=2, seed=5)
    return root


def _config(data, out, **kw) -> DetectorTrainConfig:
    # 64-px inputs keep each step cheap; the architecture is the demo's
    base = DetectorTrainConfig(
        data=str(data),
        out=str(out),
        batch_size=1,
        workers=1,
        eval_batch_size=2,
        progress=False,
        seed=0,
        shortest_edge=64,
        longest_edge=96,
    )
    return replace(base, **kw)


def _checkpoint(out) -> dict:
    return load_checkpoint(out / CHECKPOINT, what="test checkpoint")  # weights-only: tensors and plain containers


def _params(out) -> dict:
    return _checkpoint(out)["model"]


def test_targets_are_normalised_cxcywh_and_flip_mirrors_them(tiny_shapes):
    coco = read_split(tiny_shapes, "train")
    model = trainable_demo_model(0)
    dataset = ShapesTrainSet(coco, read_targets(coco, category_to_label(coco, model.config.id2label)))
    x, labels, boxes = dataset[(0, False)]
    xf, labels_f, boxes_f = dataset[(0, True)]
    assert boxes.shape == (labels.shape[0], 4) and labels.shape[0] > 0
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert torch.equal(xf, x.flip(-1)) and torch.equal(labels_f, labels)
    assert torch.allclose(boxes_f[:, 0], 1 - boxes[:, 0]) and torch.allclose(boxes_f[:, 1:], boxes[:, 1:])
    # every parameter trains (transformers would freeze the ResNet backbone) and aux losses are on
    assert all(p.requires_grad for p in model.parameters()) and model.config.auxiliary_loss


def test_learning_rate_warms_up_then_drops_tenfold():
    assert [lr_factor(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_factor(s, 2, drop_step=3) for s in range(5)] == [0.5, 1.0, 1.0, 0.1, 0.1]


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = FlipStepBatches(10, 3, seed=1, start=0, stop=9), FlipStepBatches(10, 3, seed=1, start=4, stop=9)
    assert list(a)[4:] == list(b)
    epoch0 = [i for batch in list(a)[:3] for i, _ in batch]
    assert len(set(epoch0)) == 9  # one epoch: no image twice, the partial batch dropped
    # the images are the shared sampler's (the head trainer's), step for step
    assert [[i for i, _ in batch] for batch in a] == list(StepBatches(10, 3, seed=1, start=0, stop=9))


def test_batches_and_flips_are_those_runs_were_trained_with():
    """Pinned: the demo trainer's own sampler drew these before it was built on the shared
    one; a change here changes every demo run (and --resume of a run made before it)."""
    got = [FlipStepBatches(10, 3, seed=1, start=0, stop=9).batch(s) for s in (0, 1, 2, 3)]
    assert got == [
        [(6, True), (1, False), (3, False)],
        [(7, True), (4, True), (8, False)],
        [(0, False), (5, False), (2, True)],
        [(2, True), (3, True), (8, False)],
    ]


def test_resume_after_two_steps_matches_an_uninterrupted_run(tiny_shapes, tmp_path):
    whole = train_detector(_config(tiny_shapes, tmp_path / "whole", max_steps=3))
    assert whole["step"] == 3
    records = [json.loads(line) for line in (tmp_path / "whole" / LOG).read_text().splitlines()]
    losses = [r["train_loss"] for r in records if r["event"] == "checkpoint"]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)

    train_detector(_config(tiny_shapes, tmp_path / "split", max_steps=2))
    after_two = _params(tmp_path / "split")
    first = _checkpoint(tmp_path / "split")["seconds"]
    train_detector(_config(tiny_shapes, tmp_path / "split", max_steps=3), resume=True)
    assert _checkpoint(tmp_path / "split")["seconds"] > first  # totals add up
    expected, got = _params(tmp_path / "whole"), _params(tmp_path / "split")
    assert expected.keys() == got.keys()
    # step 3 moved the weights, so the equality below means something
    assert any(not torch.equal(expected[k], after_two[k]) for k in expected)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_other_hyperparameters(tiny_shapes, tmp_path):
    train_detector(_config(tiny_shapes, tmp_path, max_steps=1))
    with pytest.raises(MfcacheError, match="lr="):
        train_detector(_config(tiny_shapes, tmp_path, max_steps=2, lr=1e-3), resume=True)
    with pytest.raises(MfcacheError, match="--resume"):
        train_detector(_config(tiny_shapes, tmp_path, max_steps=2))


def test_export_loads_as_a_detector_and_the_generator_is_checked(tiny_shapes, tmp_path):
    summary = train_detector(_config(tiny_shapes, tmp_path, epochs=1, batch_size=2))
    assert summary["step"] == 2 and summary["last_metrics"]["AP"] is not None
    records = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [2]  # once, at the epoch's end
    export = tmp_path / EXPORT
    generator = json.loads((export / GENERATOR_FILE).read_text())
    assert generator == {"generator_version": GENERATOR_VERSION, "seed": 5, "num_train": 4}
    training = json.loads((export / TRAINING_FILE).read_text())
    assert training["step"] == 2 and training["images_seen"] == 4 and training["hours"] > 0
    assert training["val_bbox"] == summary["last_metrics"] and training["val_images"] == 2

    # trained with real batch norms; exported with frozen ones that compute the same
    model = trainable_demo_model(0)
    model.load_state_dict(_params(tmp_path))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    exported = DeformableDetrForObjectDetection.from_pretrained(export).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(model.eval()(pixel_values=x).logits, exported(pixel_values=x).logits, atol=1e-5)

    detector = load_detector("hf:" + str(export))
    assert detector.info.family == "deformable_detr" and detector.info.label_names[0] == "ring"
    assert (detector.info.preprocess.shortest_edge, detector.info.preprocess.longest_edge) == (64, 96)
    assert check_generator(export) == generator

    (export / GENERATOR_FILE).write_text(json.dumps({**generator, "generator_version": "0"}))
    with pytest.raises(MfcacheError, match="generator version '0'"):
        load_demo(export)
