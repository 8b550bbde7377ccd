"""Reading a COCO instance-segmentation dataset, with every user mistake a clear error.

Conventions: masks are ``bool [G, H, W]`` at the image's original size; boxes are
``[G, 4] xyxy`` in original pixels (COCO stores xywh); category ids are the dataset's own
(any integers, not necessarily contiguous).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from mfcache.errors import MfcacheError
from mfcache.hashing import file_sha256


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


def _clean_segmentation(seg, height: int, width: int):
    """Drop polygon parts with fewer than 3 points; None if nothing usable is left."""
    if isinstance(seg, list):
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        return parts or None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [height, width]:
            return None
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, height, width)
        return seg
    return None


class CocoDataset:
    """A COCO annotation file plus the folder its ``file_name``s are relative to.

    ``images`` lists images sorted by id; ``category_ids`` lists categories sorted by id.
    Annotations that name unknown images or categories, duplicate ids and unreadable JSON
    raise :class:`MfcacheError` at construction, before any work is done.
    """

    def __init__(self, annotation_file: str | Path, images_dir: str | Path):
        self.annotation_file = Path(annotation_file)
        self.images_dir = Path(images_dir)
        if not self.annotation_file.is_file():
            raise MfcacheError(f"annotation file not found: {self.annotation_file}")
        if not self.images_dir.is_dir():
            raise MfcacheError(f"image folder not found: {self.images_dir}")
        try:
            data = json.loads(self.annotation_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MfcacheError(f"malformed annotation JSON {self.annotation_file}: {exc}") from None
        self.data = data
        self._validate(data)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.images = [
            CocoImage(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))
            for im in sorted(data["images"], key=lambda im: im["id"])
        ]
        self.category_ids = sorted(int(c["id"]) for c in data["categories"])
        self.category_names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        self.sha256 = file_sha256(self.annotation_file)

    def _validate(self, data) -> None:
        name = self.annotation_file.name
        if not isinstance(data, dict):
            raise MfcacheError(f"{name}: a COCO file is a JSON object with images, annotations, categories")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise MfcacheError(f"{name}: missing or invalid '{key}' list")
        data.setdefault("annotations", [])
        try:
            image_ids = [int(im["id"]) for im in data["images"]]
            for im in data["images"]:
                im["file_name"], int(im["height"]), int(im["width"])
            category_ids = {int(c["id"]) for c in data["categories"]}
            for c in data["categories"]:
                c["name"]
        except (KeyError, TypeError, ValueError) as exc:
            raise MfcacheError(f"{name}: an image or category entry lacks a valid {exc}") from None
        if len(set(image_ids)) != len(image_ids):
            raise MfcacheError(f"{name}: duplicate image ids")
        known = set(image_ids)
        for i, ann in enumerate(data["annotations"]):
            try:
                image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
                ann["id"]
            except (KeyError, TypeError, ValueError) as exc:
                raise MfcacheError(f"{name}: annotation #{i} lacks a valid {exc}") from None
            if image_id not in known:
                raise MfcacheError(f"{name}: annotation id {ann['id']} refers to unknown image id {image_id}")
            if category_id not in category_ids:
                raise MfcacheError(
                    f"{name}: annotation id {ann['id']} refers to unknown category id {category_id}"
                )

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, image: CocoImage) -> Path:
        return self.images_dir / image.file_name

    def ground_truth(self, image: CocoImage) -> GroundTruth:
        """Decoded annotations of one image; unusable segmentations (degenerate polygons,
        RLEs of the wrong size) are left out rather than guessed at."""
        h, w = image.height, image.width
        masks, boxes, cats, crowd, ids = [], [], [], [], []
        for ann in self.coco.imgToAnns.get(image.id, []):
            seg = _clean_segmentation(ann.get("segmentation"), h, w)
            if seg is None:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
            m = mask_utils.decode(rle).astype(bool)
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
                masks=torch.zeros(0, h, w, dtype=torch.bool), boxes=torch.zeros(0, 4),
                category_ids=torch.zeros(0, dtype=torch.long), iscrowd=torch.zeros(0, dtype=torch.bool),
                ann_ids=torch.zeros(0, dtype=torch.long),
            )
        return GroundTruth(
            masks=torch.from_numpy(np.stack(masks)),
            boxes=torch.tensor(boxes, dtype=torch.float32),
            category_ids=torch.tensor(cats, dtype=torch.long),
            iscrowd=torch.tensor(crowd, dtype=torch.bool),
            ann_ids=torch.tensor(ids, dtype=torch.long),
        )
