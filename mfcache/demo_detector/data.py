"""The demo detector's training data: shapes splits, their targets, the training set
(with horizontal flips), its collate, and which images (and flips) each step sees.

Shared by :mod:`mfcache.demo_detector.train` and :mod:`mfcache.demo_detector.pretrain`.
Items are keyed ``(image index, flip)``; :class:`FlipStepBatches` draws the keys of step
``s`` as a pure function of ``(seed, s)`` on top of the head trainer's
:class:`~mfcache.stages.sampling.StepBatches`, so a resumed run sees exactly the batches
an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mfcache.data.coco import CocoDataset
from mfcache.data.shapes import GENERATOR_VERSION
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.detectors.base import Preprocess
from mfcache.detectors.demo import DEMO_PREPROCESS
from mfcache.errors import MfcacheError
from mfcache.stages.sampling import StepBatches

UNBOUNDED = 2**62  # step count of a run stopped by the clock alone


@dataclass(frozen=True)
class Targets:
    """One image's training targets: ``boxes [G, 4]`` xyxy original pixels, ``labels [G]``
    model label indices; crowd annotations already removed."""

    boxes: Tensor
    labels: Tensor


def read_split(data: Path, split: str) -> CocoDataset:
    """``DIR/annotations/{split}.json`` + ``DIR/{split}/``, checked to come from the current
    shapes generator (its ``info.generator_version``)."""
    coco = CocoDataset(data / "annotations" / f"{split}.json", data / split)
    version = coco.data.get("info", {}).get("generator_version")
    if version != GENERATOR_VERSION:
        raise MfcacheError(
            f"{coco.annotation_file}: shapes generator version {version!r}, but this mfcache "
            f"generates version {GENERATOR_VERSION!r}; rewrite the data set"
        )
    return coco


def category_to_label(coco: CocoDataset, id2label: dict[int, str]) -> dict[int, int]:
    """COCO category id -> model label index, matched by category name."""
    index = {name: int(i) for i, name in id2label.items()}
    missing = [name for name in coco.category_names.values() if name not in index]
    if missing:
        raise MfcacheError(
            f"{coco.annotation_file}: category {missing[0]!r} is not one of the model's labels {sorted(index)}"
        )
    return {cid: index[name] for cid, name in coco.category_names.items()}


def read_targets(coco: CocoDataset, to_label: dict[int, int]) -> list[Targets]:
    """Targets of every image of ``coco``, in ``coco.images`` order."""
    lookup = torch.full((max(to_label) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(list(to_label))] = torch.tensor(list(to_label.values()))
    out = []
    for image in coco.images:
        gt = coco.ground_truth(image)
        keep = ~gt.iscrowd
        out.append(Targets(boxes=gt.boxes[keep], labels=lookup[gt.category_ids[keep]]))
    return out


class ShapesTrainSet(Dataset):
    """Item ``(i, flip)`` -> ``(input [3, h, w], class_labels [G], boxes [G, 4] cxcywh in
    [0, 1] of the input)``, the image and boxes mirrored left-right when ``flip``."""

    def __init__(self, coco: CocoDataset, targets: list[Targets], preprocess: Preprocess = DEMO_PREPROCESS):
        self.coco, self.targets, self.preprocess = coco, targets, preprocess

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Tensor, Tensor, Tensor]:
        index, flip = key
        image = self.coco.images[index]
        x = to_input(load_image(self.coco.image_path(image)), self.preprocess)
        t = self.targets[index]
        scale = t.boxes.new_tensor([image.width, image.height, image.width, image.height])
        x0, y0, x1, y1 = (t.boxes / scale).clamp(0, 1).unbind(-1)
        if flip:
            x, x0, x1 = x.flip(-1), 1 - x1, 1 - x0
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        return x, t.labels, boxes


def detector_collate(items: list[tuple[Tensor, Tensor, Tensor]]) -> dict:
    """:class:`ShapesTrainSet` items -> the model's keyword arguments: ``pixel_values``,
    ``pixel_mask`` (padded to the demo canvas) and transformers' ``labels``."""
    pixel_values, pixel_mask = pad_batch([x for x, _, _ in items], DEMO_PREPROCESS)
    labels = [{"class_labels": c, "boxes": b} for _, c, b in items]
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}


class FlipStepBatches(StepBatches):
    """:class:`~mfcache.stages.sampling.StepBatches` (the same images, step for step) with a
    horizontal-flip coin per image: batch ``s`` is a list of ``(index, flip)`` keys, a pure
    function of ``(seed, s)``. Each epoch's coins are drawn from the epoch's generator
    right after its permutation, as the demo trainer always drew them, so the batches
    (images and flips) of runs made before the samplers were merged are unchanged."""

    def batch(self, step: int) -> list[tuple[int, bool]]:
        chosen = super().batch(step)
        flips = self.epoch_flips(step // (self.n // self.bs))
        return [(i, bool(flips[i])) for i in chosen]

    def epoch_flips(self, epoch: int) -> Tensor:
        """``[n]`` bool: which images epoch ``epoch`` mirrors, drawn from the epoch's
        generator right after the permutation (which is replayed here to reach them)."""
        g = self.epoch_generator(epoch)
        torch.randperm(self.n, generator=g)
        return torch.rand(self.n, generator=g) < 0.5


def worker_init(_: int) -> None:
    """DataLoader workers use one thread: the main process needs the cores for the model."""
    torch.set_num_threads(1)
