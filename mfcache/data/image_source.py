"""Extraction's input: row ``r`` of a split decoded to detector input and its ground truth.

Rows are images x views, image-major (:mod:`mfcache.data.views`): row ``r`` is view
``r % views`` of image ``r // views``; view 0 is the plain image, as without views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from mfcache.data.coco import CocoDataset, GroundTruth
from mfcache.data.transforms import load_image, to_input
from mfcache.data.views import apply_view, view_preprocess, view_transform
from mfcache.detectors.base import Preprocess
from mfcache.errors import MfcacheError


@dataclass(frozen=True)
class DecodedRow:
    """Row ``position`` of a split: the detector's input ``[3, h, w]`` float (its view's
    transform applied) and the view's ground truth."""

    position: int
    input: Tensor
    gt: GroundTruth


@dataclass(frozen=True)
class UnreadableRow:
    """Row ``position`` could not be decoded: ``reason`` is the one-line message."""

    position: int
    reason: str


class ImageSource(Dataset):
    """Decodes row ``positions[j]`` (its image, transformed as its view says) and its ground
    truth (runs in DataLoader workers); ``crop``: the probability a view >= 1 is cropped
    (``extract --view-crop``). Problems come back as a message, so the main process can report
    them in one line (or, with ``--skip-bad``, record them and go on)."""

    def __init__(
        self, dataset: CocoDataset, positions: np.ndarray, preprocess: Preprocess, views: int = 1, crop: float = 0.0
    ):
        self.dataset, self.positions, self.preprocess, self.views = dataset, positions, preprocess, views
        self.crop = crop

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> DecodedRow | UnreadableRow:
        i = int(self.positions[j])
        image = self.dataset.images[i // self.views]
        try:
            path = self.dataset.image_path(image)
            pixels = load_image(path)
            if tuple(pixels.shape[1:]) != (image.height, image.width):
                raise MfcacheError(
                    f"image {path} is {pixels.shape[1]}x{pixels.shape[2]} (h x w) "
                    f"but the annotations say {image.height}x{image.width}"
                )
            try:
                gt = self.dataset.ground_truth(image)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise MfcacheError(f"cannot decode the annotations of image id {image.id} ({path}): {exc}") from None
            view = view_transform(image.id, i % self.views, crop=self.crop, hw=(image.height, image.width))
            pixels, gt = apply_view(pixels, gt, view)
            return DecodedRow(i, to_input(pixels, view_preprocess(self.preprocess, view)), gt)
        except MfcacheError as exc:
            return UnreadableRow(i, str(exc))
