"""Reading a COCO instance-segmentation dataset, with every user mistake a clear error.

Conventions: masks are ``bool [G, H, W]`` at the image's original size; boxes are
``[G, 4] xyxy`` in original pixels (COCO stores xywh); category ids are the dataset's own
(any integers, not necessarily contiguous).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from mfcache.data.segmentation import is_int, segmentation_rle, short_repr
from mfcache.data.validate import clean_annotations, file_name_problem
from mfcache.errors import MfcacheError


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    height: int
    width: int


@dataclass
class GroundTruth:
    """One image's annotations: masks [G, H, W] bool, boxes [G, 4] xyxy float,
    category_ids [G] long, iscrowd [G] bool, ann_ids [G] long (COCO annotation ids)."""

    masks: Tensor
    boxes: Tensor
    category_ids: Tensor
    iscrowd: Tensor
    ann_ids: Tensor


class CocoDataset:
    """A COCO annotation file plus the folder its ``file_name``s are relative to.

    ``images`` lists images sorted by id; ``category_ids`` lists categories sorted by id.
    Every field extract, train and eval read is checked here, at construction, before any
    work is done (:mod:`mfcache.data.validate`): unreadable JSON, unknown or duplicate ids,
    image sizes and ``file_name``s leading outside ``images_dir`` and bad annotation fields
    raise :class:`MfcacheError` in one line. With ``skip_bad`` a bad annotation is left out
    (``report.left_out``) and an image with a bad ``file_name`` is kept but unreadable
    (:meth:`image_path` raises), so extraction records it as skipped.

    ``data`` is the cleaned file (derived ``bbox``/``area``/``iscrowd`` filled in, left-out
    annotations removed) and ``stored`` its bytes (the file's own when nothing changed),
    ``sha256`` their hash: what the cache stores, so eval scores what extract accepted.
    """

    def __init__(self, annotation_file: str | Path, images_dir: str | Path, *, skip_bad: bool = False):
        self.annotation_file = Path(annotation_file)
        self.images_dir = Path(images_dir)
        if not self.annotation_file.is_file():
            raise MfcacheError(f"annotation file not found: {self.annotation_file}")
        if not self.images_dir.is_dir():
            raise MfcacheError(f"image folder not found: {self.images_dir}")
        raw = self.annotation_file.read_bytes()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MfcacheError(f"malformed annotation JSON {self.annotation_file}: {exc}") from None
        self._validate(data)
        self.bad_files = self._check_file_names(data["images"], skip_bad)
        annotations, self.report = clean_annotations(
            data["annotations"],
            source=self.annotation_file.name,
            skip_bad=skip_bad,
            image_hw={im["id"]: (im["height"], im["width"]) for im in data["images"]},
            category_ids={c["id"] for c in data["categories"]},
        )
        if self.report.changed:
            data = {**data, "annotations": annotations}
            raw = json.dumps(data).encode()
        self.data, self.stored, self.sha256 = data, raw, hashlib.sha256(raw).hexdigest()
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.images = [
            CocoImage(im["id"], str(im["file_name"]), im["height"], im["width"])
            for im in sorted(data["images"], key=lambda im: im["id"])
        ]
        self.category_ids = sorted(c["id"] for c in data["categories"])
        self.category_names = {c["id"]: str(c["name"]) for c in data["categories"]}

    def _validate(self, data) -> None:
        """The file's structure: images with unique integer ids and positive integer sizes,
        categories with integer ids and names."""
        name = self.annotation_file.name
        if not isinstance(data, dict):
            raise MfcacheError(f"{name}: a COCO file is a JSON object with images, annotations, categories")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise MfcacheError(f"{name}: missing or invalid '{key}' list")
        data.setdefault("annotations", [])
        if not isinstance(data["annotations"], list):
            raise MfcacheError(f"{name}: 'annotations' must be a list")
        for i, im in enumerate(data["images"]):
            self._require(im, f"image #{i}", "id", is_int, "an integer")
            for key in ("height", "width"):
                self._require(im, f"image #{i}", key, lambda v: is_int(v) and v >= 1, "a positive integer")
            self._require(im, f"image #{i}", "file_name", lambda v: v is not None, "a path")
        for i, category in enumerate(data["categories"]):
            self._require(category, f"category #{i}", "id", is_int, "an integer")
            self._require(category, f"category #{i}", "name", lambda v: v is not None, "a name")
        image_ids = [im["id"] for im in data["images"]]
        if len(set(image_ids)) != len(image_ids):
            raise MfcacheError(f"{name}: duplicate image ids")

    def _require(self, entry, what: str, key: str, valid, expected: str) -> None:
        """:class:`MfcacheError` unless ``entry`` (an image or category, ``what``) has ``key``
        with a value for which ``valid`` holds."""
        value = entry.get(key) if isinstance(entry, dict) else None
        if not valid(value):
            raise MfcacheError(
                f"{self.annotation_file.name}: {what} lacks a valid '{key}' ({expected}), got {short_repr(value)}"
            )

    def _check_file_names(self, images: list[dict], skip_bad: bool) -> dict[int, str]:
        """``{image id: reason}`` for images whose ``file_name`` leads outside the image
        folder; the first one is an error unless ``skip_bad``."""
        bad = {im["id"]: why for im in images if (why := file_name_problem(im["file_name"]))}
        if bad and not skip_bad:
            image_id, why = next(iter(bad.items()))
            more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
            raise MfcacheError(
                f"{self.annotation_file.name}: image id {image_id}: {why}{more} "
                "(pass `extract.skip_bad` to record such images as skipped)"
            )
        return bad

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, image: CocoImage) -> Path:
        """The image's file; :class:`MfcacheError` if its ``file_name`` leads outside the folder
        (possible only under ``skip_bad``)."""
        if why := self.bad_files.get(image.id):
            raise MfcacheError(f"image id {image.id}: {why}")
        return self.images_dir / image.file_name

    def ground_truth(self, image: CocoImage) -> GroundTruth:
        """Decoded annotations of one image (all checked at load); masks without a pixel
        are left out, as they can never be matched."""
        h, w = image.height, image.width
        masks, boxes, cats, crowd, ids = [], [], [], [], []
        for ann in self.coco.imgToAnns.get(image.id, []):
            m = mask_utils.decode(segmentation_rle(ann["segmentation"], h, w)).astype(bool)
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            masks.append(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            cats.append(int(ann["category_id"]))
            crowd.append(bool(ann.get("iscrowd", 0)))
            ids.append(int(ann["id"]))
        if not masks:
            return GroundTruth(
                masks=torch.zeros(0, h, w, dtype=torch.bool),
                boxes=torch.zeros(0, 4),
                category_ids=torch.zeros(0, dtype=torch.long),
                iscrowd=torch.zeros(0, dtype=torch.bool),
                ann_ids=torch.zeros(0, dtype=torch.long),
            )
        return GroundTruth(
            masks=torch.from_numpy(np.stack(masks)),
            boxes=torch.tensor(boxes, dtype=torch.float32),
            category_ids=torch.tensor(cats, dtype=torch.long),
            iscrowd=torch.tensor(crowd, dtype=torch.bool),
            ann_ids=torch.tensor(ids, dtype=torch.long),
        )
