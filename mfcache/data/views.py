"""Augmentation with a cache: ``extract --views N`` stores every image N times.

Layout: a split of ``I`` images and ``N`` views has ``I * N`` rows, image-major: row
``r`` holds view ``r % N`` of image ``r // N`` (images in the annotation file's id order),
each row with its own image id (``index/image_id``, repeated N times). The view index is
derived from the row and the fingerprint's ``extract.views``, not stored, so a
``--views 1`` cache is array for array the cache made before views existed.

View 0 is the plain image, exactly as without views (eval, validation and predict read
only view 0 rows, so each image is scored once). View ``v >= 1`` is a full detector pass
over a transformed image, with its own targets (:func:`view_transform`):

* horizontal flip on odd views (the image and its GT masks and boxes, consistently);
* the detector's input resized by a factor from :data:`SCALES` (DETR's multi-scale range:
  shortest edges 480..800 of 800 -> 0.6..1.0), drawn from a generator seeded by
  ``(image_id, view)``; even views never draw 1.0, so no view repeats view 0.

The GT stays at the original image size (a scale changes only the detector input, and
targets map boxes from input to original pixels as for view 0), so ``index/orig_hw`` is the
image's own and only ``index/input_hw`` differs between views.

Training draws one view per image per epoch (:class:`ViewStepBatches`), a pure function of
``(seed, epoch, image)``, so a resumed run sees the same views.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mfcache.detectors.base import Preprocess

SCALES = (0.6, 0.7, 0.8, 0.9, 1.0)  # of the detector's own input size


@dataclass(frozen=True)
class ViewTransform:
    """One view's transform: ``flip`` mirrors left-right; ``scale`` multiplies the detector's
    input size (shortest and longest edge, or ``fixed_size``)."""

    flip: bool = False
    scale: float = 1.0

    @property
    def identity(self) -> bool:
        return not self.flip and self.scale == 1.0


def view_transform(image_id: int, view: int) -> ViewTransform:
    """The deterministic transform of view ``view`` of image ``image_id`` (view 0: none)."""
    if view == 0:
        return ViewTransform()
    g = torch.Generator().manual_seed(int(image_id) * 1_000_003 + int(view))
    flip = view % 2 == 1
    scales = SCALES if flip else tuple(s for s in SCALES if s != 1.0)
    return ViewTransform(flip=flip, scale=scales[int(torch.randint(len(scales), (1,), generator=g))])


def view_preprocess(preprocess: Preprocess, t: ViewTransform) -> Preprocess:
    """The detector's preprocessing with the input size scaled by ``t.scale`` (itself at 1.0)."""
    if t.scale == 1.0:
        return preprocess
    if preprocess.fixed_size is not None:
        return dataclasses.replace(preprocess, fixed_size=tuple(max(1, round(s * t.scale))
                                                                for s in preprocess.fixed_size))
    return dataclasses.replace(preprocess, shortest_edge=max(1, round(preprocess.shortest_edge * t.scale)),
                               longest_edge=max(1, round(preprocess.longest_edge * t.scale)))


def row_views(num_rows: int, views: int) -> np.ndarray:
    """``[R]`` the view index of every row of a split (image-major layout)."""
    return np.arange(num_rows) % views


def rows_input_hw(preprocess: Preprocess, image_ids, orig_hw, views: int) -> np.ndarray:
    """``[R, 2]`` detector input (h, w) of every row, from the rows' ``image_ids [R]`` and
    ``orig_hw [R, 2]`` (each image repeated ``views`` times)."""
    orig_hw = np.asarray(orig_hw).reshape(-1, 2)
    out = [view_preprocess(preprocess, view_transform(int(i), int(v))).input_size(int(h), int(w))
           for i, v, (h, w) in zip(image_ids, row_views(len(orig_hw), views), orig_hw)]
    return np.asarray(out, dtype=np.int32).reshape(-1, 2)


def flip_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` mirrored left-right."""
    return pixels.flip(-1)


def flip_ground_truth(gt, width: int):
    """A :class:`~mfcache.data.coco.GroundTruth` mirrored left-right in an image ``width`` wide:
    masks ``[G, H, W]`` flipped, boxes ``[G, 4]`` xyxy ``(W - x2, y1, W - x1, y2)``."""
    boxes = gt.boxes.clone()
    boxes[:, 0], boxes[:, 2] = width - gt.boxes[:, 2], width - gt.boxes[:, 0]
    return dataclasses.replace(gt, masks=gt.masks.flip(-1), boxes=boxes)


def view_rows(done: np.ndarray, views: int, *, all_views: bool) -> np.ndarray:
    """The rows a reader serves, from ``index/done [R]`` (1 = written): ``[M, views]`` the rows
    of every image whose views are all written (``all_views``), or ``[M, 1]`` its view 0 row.
    ``M`` images in split order; a skipped image has no written view."""
    rows = np.arange(len(done)).reshape(-1, views)
    complete = (done.reshape(-1, views) == 1).all(1)
    rows = rows[complete]
    return rows if all_views else rows[:, :1]


def epoch_views(seed: int, epoch: int, num_images: int, views: int) -> torch.Tensor:
    """``[num_images]`` long: the view each image is drawn at in epoch ``epoch``, a pure
    function of ``(seed, epoch)`` (its own generator, independent of the batch order)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1_000_000_007)  # not a batch-order stream
    return torch.randint(views, (num_images,), generator=g)
