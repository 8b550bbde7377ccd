"""Every annotation field that extract, train and eval read, checked once when the
annotation file is loaded (before anything is written), and cleaned into what eval can score.

Per annotation (docs/guarantees.md lists the same):
- ``image_id``, ``category_id``: integers naming a listed image / category, else an error;
- ``segmentation``: polygons (lists of an even count of finite numbers, at most one image
  size outside the image, outline at most ``H * W`` pixels: :mod:`mfcache.data.segmentation`) or an RLE (compressed string or
  uncompressed counts) whose ``size`` is the image's and whose runs cover it exactly, else an
  error; missing or ``[]`` is an error too (a mask cannot be derived from a box);
  polygon parts with fewer than 3 points or no area are dropped, and an annotation left with
  no part is left out (it marks no pixel);
- ``bbox``: a list of 4 finite numbers with ``w, h >= 0``, else an error; derived from the
  segmentation when missing;
- ``area``: a finite number ``>= 0``, else an error; derived (mask area) when missing;
- ``iscrowd``: 0 or 1, else an error; 0 when missing.
An error stops the load with one line naming the annotation id and the field, unless
``skip_bad``: then the annotation is left out and recorded with its reason.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

from pycocotools import mask as mask_utils

from mfcache.data.segmentation import (
    check_outline,
    encloses_area,
    is_int,
    polygon_points,
    rle_counts,
    segmentation_rle,
    short_repr,
)
from mfcache.errors import MfcacheError


class BadAnnotation(ValueError):
    """An annotation field that is wrong and cannot be derived: ``field`` and why."""

    def __init__(self, field_name: str, why: str):
        super().__init__(f"{field_name} {why}")
        self.field = field_name


class EmptyAnnotation(ValueError):
    """An annotation whose segmentation marks no pixel (every polygon part is a point or a line)."""


@dataclass
class AnnotationReport:
    """What loading did to the annotations: fields derived (field -> count), polygon parts
    dropped, and the annotations left out (``{annotation id: reason}``; ``bad`` of them for an
    error under ``skip_bad``, the rest empty)."""

    derived: Counter = field(default_factory=Counter)
    dropped_parts: int = 0
    left_out: dict[int, str] = field(default_factory=dict)
    bad: int = 0

    @property
    def changed(self) -> bool:
        """Whether the cleaned annotations differ from the file's."""
        return bool(self.derived or self.dropped_parts or self.left_out)

    def summary(self) -> str:
        """One line for the user ('' when nothing was changed)."""
        notes = []
        if self.derived:
            (name, n), *rest = sorted(self.derived.items())
            notes.append(
                f"derived {name} for {n} annotation{'s' * (n != 1)}"
                + "".join(f", {other} for {m}" for other, m in rest)
            )
        if self.dropped_parts:
            notes.append(
                f"dropped {self.dropped_parts} polygon part{'s' * (self.dropped_parts != 1)} "
                "with fewer than 3 points or no area"
            )
        if empty := len(self.left_out) - self.bad:
            notes.append(f"left out {empty} annotation{'s' * (empty != 1)} whose polygons mark no pixel")
        if self.bad:
            notes.append(f"skipped {self.bad} bad annotation{'s' * (self.bad != 1)}")
        return "annotations: " + "; ".join(notes) if notes else ""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def file_name_problem(file_name) -> str | None:
    """Why an image ``file_name`` cannot be read from inside the image folder, or None.
    Checked on the name alone (``..`` and absolute paths): links inside the folder are the
    user's own and stay allowed."""
    if not isinstance(file_name, str) or not file_name.strip():
        return f"file_name must be a non-empty path, got {short_repr(file_name)}"
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")):
        return f"file_name {file_name!r} is an absolute path; it must be relative to the image folder"
    parts = os.path.normpath(file_name).replace("\\", "/").split("/")
    if parts[0] in ("..", "."):
        return f"file_name {file_name!r} leads outside the image folder"
    return None


def clean_segmentation(segmentation, height: int, width: int) -> tuple[list | dict, int]:
    """A checked segmentation and the number of polygon parts dropped (fewer than 3 points
    or no area). :class:`BadAnnotation` for anything wrong, :class:`EmptyAnnotation` when no
    polygon part is left."""
    if segmentation is None or segmentation == []:
        raise BadAnnotation(
            "segmentation", "is missing (a mask cannot be derived from a box); give a polygon or an RLE"
        )
    try:
        if isinstance(segmentation, dict):
            rle_counts(segmentation, height, width)
            return segmentation, 0
        if not isinstance(segmentation, list):
            raise ValueError(f"must be a list of polygons or an RLE dict, got {short_repr(segmentation)}")
        parts = [polygon_points(part, height, width) for part in segmentation]
        check_outline(parts, height, width)
    except ValueError as exc:
        raise BadAnnotation("segmentation", f"is invalid: {exc}") from None
    kept = [part for part, points in zip(segmentation, parts) if encloses_area(points)]
    if not kept:
        raise EmptyAnnotation("its polygons have fewer than 3 points or no area")
    return kept, len(segmentation) - len(kept)


def check_bbox(bbox) -> None:
    """:class:`BadAnnotation` unless ``bbox`` is ``[x, y, w, h]``: 4 finite numbers, w, h >= 0."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise BadAnnotation("bbox", f"must be a list of 4 finite numbers [x, y, w, h], got {short_repr(bbox)}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise BadAnnotation("bbox", f"has a negative width or height: {short_repr(bbox)}")


def check_area(area) -> None:
    """:class:`BadAnnotation` unless ``area`` is a finite number >= 0."""
    if not (_is_number(area) and area >= 0):
        raise BadAnnotation("area", f"must be a finite number >= 0, got {short_repr(area)}")


def clean_annotation(
    ann: dict, *, image_hw: dict[int, tuple[int, int]], category_ids: set[int]
) -> tuple[dict, list[str], int]:
    """One annotation, checked: ``(cleaned copy, names of the fields derived, polygon parts
    dropped)``. Raises :class:`BadAnnotation` or :class:`EmptyAnnotation`."""
    image_id, category_id = ann.get("image_id"), ann.get("category_id")
    if not is_int(image_id) or image_id not in image_hw:
        raise BadAnnotation("image_id", f"refers to unknown image id {short_repr(image_id)}")
    if not is_int(category_id) or category_id not in category_ids:
        raise BadAnnotation("category_id", f"refers to unknown category id {short_repr(category_id)}")
    height, width = image_hw[image_id]
    cleaned, derived = dict(ann), []
    if "iscrowd" not in ann:
        cleaned["iscrowd"], derived = 0, ["iscrowd"]
    elif not (isinstance(ann["iscrowd"], (int, float)) and ann["iscrowd"] in (0, 1)):
        raise BadAnnotation("iscrowd", f"must be 0 or 1, got {short_repr(ann['iscrowd'])}")
    cleaned["segmentation"], dropped = clean_segmentation(ann.get("segmentation"), height, width)
    for name, check in (("bbox", check_bbox), ("area", check_area)):
        if name in ann:
            check(ann[name])
    missing = [name for name in ("bbox", "area") if name not in ann]
    if missing:
        rle = segmentation_rle(cleaned["segmentation"], height, width)
        values = {"bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle))}
        cleaned.update({name: values[name] for name in missing})
        derived += missing
    return cleaned, derived, dropped


def clean_annotations(
    annotations: list, *, source: str, image_hw: dict[int, tuple[int, int]], category_ids: set[int], skip_bad: bool
) -> tuple[list[dict], AnnotationReport]:
    """Every annotation of a file (``source`` names it in messages), checked and cleaned.
    Raises :class:`MfcacheError` for an annotation without a unique integer id, and for the
    first bad annotation unless ``skip_bad`` (then it is left out and recorded)."""
    report, kept, seen, bad = AnnotationReport(), [], set(), []
    for i, ann in enumerate(annotations):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not is_int(ann_id):
            raise MfcacheError(f"{source}: annotation #{i} lacks a valid 'id' (an integer), got {short_repr(ann_id)}")
        if ann_id in seen:
            raise MfcacheError(f"{source}: duplicate annotation id {ann_id}")
        seen.add(ann_id)
        try:
            cleaned, derived, dropped = clean_annotation(ann, image_hw=image_hw, category_ids=category_ids)
        except EmptyAnnotation as exc:
            report.left_out[ann_id] = str(exc)
            continue
        except BadAnnotation as exc:
            bad.append((ann_id, str(exc)))
            report.left_out[ann_id] = str(exc)
            continue
        report.derived.update(derived)
        report.dropped_parts += dropped
        kept.append(cleaned)
    report.bad = len(bad)
    if bad and not skip_bad:
        ann_id, why = bad[0]
        more = f" ({len(bad) - 1} more bad annotations)" if len(bad) > 1 else ""
        raise MfcacheError(
            f"{source}: annotation id {ann_id}: {why}{more}; fix the file or pass `extract.skip_bad` "
            "to leave bad annotations out"
        )
    return kept, report
