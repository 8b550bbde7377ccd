"""Dense backbone pretraining for the demo detector: labels, loss, and the hand-over."""

import json

import pytest
import torch

from mfcache.checkpoint_io import load_checkpoint
from mfcache.data.shapes import write_shapes_dataset
from mfcache.demo_detector.data import category_to_label, read_split
from mfcache.demo_detector.model import trainable_demo_model
from mfcache.demo_detector.pretrain import (
    BACKBONE_FILE,
    IGNORE,
    SemanticShapes,
    backbone_of,
    pretrain,
    segmentation_loss,
)
from mfcache.demo_detector.train import CHECKPOINT, DetectorTrainConfig, train_detector
from mfcache.errors import MfcacheError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_shapes")
    write_shapes_dataset(root, num_train=16, num_val=2, seed=5)  # seed 5: image 15 holds a crowd
    return root


def test_label_maps_mark_instances_by_class_and_ignore_crowds(shapes):
    coco = read_split(shapes, "train")
    to_label = category_to_label(coco, trainable_demo_model(0).config.id2label)
    dataset = SemanticShapes(coco, to_label)
    seen_crowd = False
    for i, image in enumerate(coco.images):
        x, labels = dataset[(i, False)]
        assert labels.shape == x.shape[1:]
        gt = coco.ground_truth(image)
        expected = {0} | {
            IGNORE if c else 1 + to_label[k] for k, c in zip(gt.category_ids.tolist(), gt.iscrowd.tolist())
        }
        assert set(labels.unique().tolist()) <= expected and 0 in labels
        seen_crowd |= bool(gt.iscrowd.any())
        _, flipped = dataset[(i, True)]
        assert torch.equal(flipped, labels.flip(-1))
    assert seen_crowd


def test_loss_reads_labels_at_the_logits_stride_and_skips_ignored_pixels():
    labels = torch.full((1, 16, 16), IGNORE)
    labels[0, 4::8, 4::8] = torch.tensor([[1, 0], [2, 1]])  # the pixels a stride-8 map sees
    logits = torch.full((1, 3, 2, 2), -10.0)
    for y, x, k in [(0, 0, 1), (0, 1, 0), (1, 0, 2), (1, 1, 1)]:
        logits[0, k, y, x] = 10.0
    assert segmentation_loss(logits, labels) < 1e-6
    labels[0, 4, 4] = IGNORE  # an ignored pixel costs nothing, even if predicted wrong
    logits[0, :, 0, 0] = torch.tensor([10.0, -10.0, -10.0])
    assert segmentation_loss(logits, labels) < 1e-6


def test_pretrained_backbone_starts_the_detector(shapes, tmp_path):
    summary = pretrain(shapes, tmp_path / "pt", minutes=0.05, batch_size=4, workers=0, progress=False)
    assert summary["steps"] >= 1 and 0 <= summary["val_pixel_accuracy"] <= 1
    assert json.loads((tmp_path / "pt" / "pretrain.json").read_text())["steps"] == summary["steps"]
    saved = torch.load(tmp_path / "pt" / BACKBONE_FILE, weights_only=True)
    assert any(not torch.equal(v, backbone_of(trainable_demo_model(0)).state_dict()[k]) for k, v in saved.items())

    config = DetectorTrainConfig(
        data=str(shapes),
        out=str(tmp_path / "run"),
        max_steps=0,
        batch_size=2,
        workers=0,
        progress=False,
        backbone_init=str(tmp_path / "pt" / BACKBONE_FILE),
    )
    train_detector(config)
    model = load_checkpoint(tmp_path / "run" / CHECKPOINT, what="test checkpoint")["model"]
    prefix = "model.backbone.model."
    assert all(torch.equal(model[prefix + k], v) for k, v in saved.items())

    (tmp_path / "junk.pt").write_text("not weights")
    with pytest.raises(MfcacheError, match="--backbone-init"):
        train_detector(
            DetectorTrainConfig(
                data=str(shapes),
                out=str(tmp_path / "run2"),
                max_steps=0,
                progress=False,
                backbone_init=str(tmp_path / "junk.pt"),
            )
        )
