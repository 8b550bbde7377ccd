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
  ``(image_id, view)``; even views never draw 1.0, so no view repeats view 0;
* optionally (``extract --view-crop P``, default 0 = never), before the flip and the scale, a
  random crop with probability ``P`` (:func:`view_crop`, its own generator): DETR's random
  crop, which then resizes the crop to the detector's size as every view is.

The GT stays at the size of the view's frame (a scale changes only the detector input, and
targets map boxes from input to frame pixels as for view 0): ``index/orig_hw`` is the image's
own size, except on a cropped view, whose frame is the crop (``orig_hw`` its ``(h, w)``, the
GT cropped with it: :func:`crop_ground_truth`). Per-row sizes: :func:`rows_frames`.

Training draws one view per image per epoch (:class:`ViewStepBatches`), a pure function of
``(seed, epoch, image)``, so a resumed run sees the same views.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from mfcache.detectors.base import Preprocess

SCALES = (0.6, 0.7, 0.8, 0.9, 1.0)  # of the detector's own input size
CROP_SIDES = (0.5, 1.0)  # a crop's height and width, each a uniform fraction of the image's
CROP_STREAM = 1 << 52  # added to the (image, view) seed: crops draw from a stream of their own


@dataclass(frozen=True)
class ViewTransform:
    """One view's transform, applied in this order: ``crop`` ``(top, left, h, w)`` in original
    pixels (None: the whole image) makes the view's frame; ``flip`` mirrors it left-right;
    ``scale`` multiplies the detector's input size (shortest and longest edge, or ``fixed_size``)."""

    flip: bool = False
    scale: float = 1.0
    crop: tuple[int, int, int, int] | None = None

    @property
    def identity(self) -> bool:
        return not self.flip and self.scale == 1.0 and self.crop is None


def view_transform(image_id: int, view: int, *, crop: float = 0.0, hw: tuple[int, int] | None = None) -> ViewTransform:
    """The deterministic transform of view ``view`` of image ``image_id`` (view 0: none);
    ``crop``: the probability of a crop (:func:`view_crop`) of the image of ``hw = (h, w)``."""
    if view == 0:
        return ViewTransform()
    g = torch.Generator().manual_seed(int(image_id) * 1_000_003 + int(view))
    flip = view % 2 == 1
    scales = SCALES if flip else tuple(s for s in SCALES if s != 1.0)
    return ViewTransform(
        flip=flip,
        scale=scales[int(torch.randint(len(scales), (1,), generator=g))],
        crop=view_crop(image_id, view, hw, crop) if crop > 0 else None,
    )


def view_crop(image_id: int, view: int, hw: tuple[int, int], p: float) -> tuple[int, int, int, int] | None:
    """The crop ``(top, left, h, w)`` of view ``view >= 1`` of image ``image_id`` (``hw``: the
    image's ``(h, w)``), or None (uncropped, with probability ``1 - p``; view 0 never).

    DETR's crop (RandomSizeCrop(384, 600) after resizing the shortest side to 400..600) picks
    each side independently, between 384 px and 600 px of an image about 600 x 800: roughly 0.5
    to 1.0 of each side. Pixel bounds mean nothing at other image sizes, so here each side is
    a uniform fraction of the image's in :data:`CROP_SIDES` (at least 1 px), independently (the
    aspect ratio changes, as DETR's does), placed uniformly. From a generator of its own,
    seeded by ``(image_id, view)``: the flip and scale draws are those of an uncropped view, and
    a larger ``p`` crops the same views plus more. Instances can lose every pixel (DETR keeps
    such crops too): the view then has fewer GT, or none."""
    if view == 0 or p <= 0:
        return None
    g = torch.Generator().manual_seed(int(image_id) * 1_000_003 + int(view) + CROP_STREAM)
    if float(torch.rand((), generator=g)) >= p:
        return None
    sides = []
    for n in hw:
        low = max(1, math.ceil(CROP_SIDES[0] * n))
        side = int(torch.randint(low, max(low, math.floor(CROP_SIDES[1] * n)) + 1, (1,), generator=g))
        sides.append((int(torch.randint(0, n - side + 1, (1,), generator=g)), side))
    (top, h), (left, w) = sides
    return top, left, h, w


def view_preprocess(preprocess: Preprocess, t: ViewTransform) -> Preprocess:
    """The detector's preprocessing with the input size scaled by ``t.scale`` (itself at 1.0)."""
    if t.scale == 1.0:
        return preprocess
    if preprocess.fixed_size is not None:
        return dataclasses.replace(
            preprocess, fixed_size=tuple(max(1, round(s * t.scale)) for s in preprocess.fixed_size)
        )
    return dataclasses.replace(
        preprocess,
        shortest_edge=max(1, round(preprocess.shortest_edge * t.scale)),
        longest_edge=max(1, round(preprocess.longest_edge * t.scale)),
    )


def row_views(num_rows: int, views: int) -> np.ndarray:
    """``[R]`` the view index of every row of a split (image-major layout)."""
    return np.arange(num_rows) % views


def rows_frames(image_ids, image_hw, views: int, crop: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a split of images ``image_ids [I]`` of sizes ``image_hw [I, 2]``: ``(image_id
    [R], orig_hw [R, 2])``, ``R = I * views`` image-major; ``orig_hw`` is the view's frame, the
    image's size or its crop's (``crop``: the probability of a crop, :func:`view_crop`)."""
    ids = np.repeat(np.asarray(image_ids, dtype=np.int64), views)
    orig_hw = np.repeat(np.asarray(image_hw, dtype=np.int64).reshape(-1, 2), views, axis=0)
    if crop > 0:
        for r, (i, v) in enumerate(zip(ids, row_views(len(ids), views))):
            if box := view_crop(int(i), int(v), tuple(int(x) for x in orig_hw[r]), crop):
                orig_hw[r] = box[2:]
    return ids, orig_hw.astype(np.int32)


def rows_input_hw(preprocess: Preprocess, image_ids, orig_hw, views: int) -> np.ndarray:
    """``[R, 2]`` detector input (h, w) of every row, from the rows' ``image_ids [R]`` and
    ``orig_hw [R, 2]`` (each image repeated ``views`` times; a cropped view's is its crop's,
    :func:`rows_frames`), rescaled as each view says."""
    orig_hw = np.asarray(orig_hw).reshape(-1, 2)
    out = [
        view_preprocess(preprocess, view_transform(int(i), int(v))).input_size(int(h), int(w))
        for i, v, (h, w) in zip(image_ids, row_views(len(orig_hw), views), orig_hw)
    ]
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


def crop_ground_truth(gt, box: tuple[int, int, int, int]):
    """A :class:`~mfcache.data.coco.GroundTruth` cropped to ``box = (top, left, h, w)``: masks
    ``[G, H, W]`` sliced to ``[G', h, w]``, instances (crowd regions too) left without a pixel
    dropped, boxes ``[G', 4]`` xyxy recomputed from the cropped masks as
    :meth:`~mfcache.data.coco.CocoDataset.ground_truth` makes them (``x2 = last column + 1``)."""
    top, left, h, w = box
    masks = gt.masks[:, top : top + h, left : left + w]
    keep = masks.flatten(1).any(1)
    masks = masks[keep]
    rows, cols = masks.any(2), masks.any(1)  # [G', h], [G', w]
    ys, xs = torch.arange(h), torch.arange(w)
    boxes = torch.stack(
        [
            torch.where(cols, xs, w).amin(1),
            torch.where(rows, ys, h).amin(1),
            torch.where(cols, xs, -1).amax(1) + 1,
            torch.where(rows, ys, -1).amax(1) + 1,
        ],
        1,
    )
    return dataclasses.replace(
        gt,
        masks=masks,
        boxes=boxes.float().reshape(-1, 4),
        category_ids=gt.category_ids[keep],
        iscrowd=gt.iscrowd[keep],
        ann_ids=gt.ann_ids[keep],
    )


def apply_view(pixels: torch.Tensor, gt, t: ViewTransform):
    """``pixels [C, H, W]`` and their GT as view ``t`` sees them: cropped, then flipped (the
    scale is the detector's resize: :func:`view_preprocess`)."""
    if t.crop is not None:
        top, left, h, w = t.crop
        pixels, gt = pixels[:, top : top + h, left : left + w], crop_ground_truth(gt, t.crop)
    if t.flip:
        pixels, gt = flip_pixels(pixels), flip_ground_truth(gt, pixels.shape[-1])
    return pixels, gt


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
