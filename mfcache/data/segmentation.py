"""COCO segmentations (polygons, compressed and uncompressed RLE) -> RLE masks, with
memory bounded by the image's own size.

pycocotools trusts its input: a NaN polygon coordinate becomes an arbitrary ``int`` and its
polygon tracer allocates memory in proportion to the outline's length (24 GB were seen),
and an RLE whose counts run past ``height * width`` makes its decoder write beyond the mask.
Every segmentation therefore passes the checks below before pycocotools sees it; the same
checks give the one-line reasons :mod:`mfcache.data.validate` reports at load time.

Bounds (a polygon is drawn exactly as pycocotools draws it, never reshaped):
- coordinates are finite and lie at most one image size outside the image
  (``x`` in ``[-W, 2W]``, ``y`` in ``[-H, 2H]``);
- the outline (all parts, each edge counted by its longer side) is at most ``H * W`` pixels
  long (a longer outline must revisit pixels), or :data:`OUTLINE_FLOOR` on small images.
  pycocotools' tracer then needs at most about ``120 * max(H * W, OUTLINE_FLOOR)`` bytes, the
  decoded mask ``H * W``.
"""

from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils

MIN_POLYGON_POINTS = 3
OUTSIDE_MARGIN = 1.0  # polygon coordinates may lie this many image sizes outside the image
OUTLINE_FLOOR = 4096  # outline pixels allowed on any image, however small (under 1 MB to trace)


def polygon_points(part, height: int, width: int) -> np.ndarray:
    """One polygon part ``[x0, y0, x1, y1, ...]`` -> ``[k, 2]`` float64 points; ValueError
    (one line, naming the problem) unless it is a list of an even number of finite numbers
    within :data:`OUTSIDE_MARGIN` image sizes of the ``height x width`` image."""
    if not isinstance(part, list):
        raise ValueError(f"a polygon is a list of numbers [x0, y0, x1, y1, ...], got {short_repr(part)}")
    try:
        values = np.asarray(part) if part else np.zeros(0)
    except ValueError:  # ragged nesting
        values = np.zeros((0, 0))
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise ValueError(f"a polygon is a list of numbers [x0, y0, x1, y1, ...], got {short_repr(part)}")
    if len(values) % 2:
        raise ValueError(f"a polygon has an even count of numbers (x, y pairs), got {len(values)}")
    points = values.astype(np.float64, copy=False).reshape(-1, 2)
    size = np.array([width, height], dtype=np.float64)
    inside = (points >= -OUTSIDE_MARGIN * size) & (points <= (1 + OUTSIDE_MARGIN) * size)  # False for NaN
    if not inside.all():
        if not np.isfinite(points).all():
            raise ValueError(f"polygon coordinate {short_repr(points[~np.isfinite(points)][0])} is not a finite number")
        x, y = points[~inside.all(axis=1)][0]
        raise ValueError(
            f"polygon point ({x:g}, {y:g}) lies more than one image size outside the {width}x{height} (w x h) image"
        )
    return points


def encloses_area(points: np.ndarray) -> bool:
    """Whether a ``[k, 2]`` polygon has 3 or more points and a non-zero (shoelace) area;
    anything less is a point or a line, which marks no pixel."""
    if len(points) < MIN_POLYGON_POINTS:
        return False
    x, y = points[:, 0], points[:, 1]
    twice_area = np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1]
    return bool(twice_area != 0)


def outline_length(parts: list[np.ndarray]) -> float:
    """Pixels pycocotools' tracer walks for these ``[k, 2]`` parts (closed, per edge the longer
    of |dx| and |dy|): what its memory grows with."""
    total = 0.0
    for points in parts:
        if len(points):
            total += float(np.abs(points[1:] - points[:-1]).max(axis=1, initial=0).sum())
            total += float(np.abs(points[0] - points[-1]).max())
    return total


def check_outline(parts: list[np.ndarray], height: int, width: int) -> None:
    """ValueError unless the outline of ``parts`` is at most ``height * width`` (or
    :data:`OUTLINE_FLOOR`) pixels long."""
    length = outline_length(parts)
    if length > max(height * width, OUTLINE_FLOOR):
        raise ValueError(
            f"polygon outline is {length:.0f} pixels long, longer than the {width}x{height} image has pixels"
        )


def string_counts(counts: str) -> np.ndarray:
    """pycocotools' compressed RLE string -> run lengths (int64), decoded as its
    ``rleFrString`` does; ValueError for characters outside its alphabet, a string that
    ends inside a number, or a negative run."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("compressed RLE counts end inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE counts contain {counts[p]!r}, outside pycocotools' alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("compressed RLE counts decode to a negative run length")
        runs.append(x)
    return np.asarray(runs, dtype=np.int64)


def rle_counts(rle, height: int, width: int) -> np.ndarray:
    """The run lengths of an RLE ``{"size": [h, w], "counts": str | list}``; ValueError (one
    line) unless ``size`` is the image's ``[height, width]`` and the runs are non-negative
    integers covering exactly ``height * width`` pixels."""
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        raise ValueError(f"RLE size must be [height, width], got {short_repr(size)}")
    if size != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image's [{height}, {width}] (height, width)")
    counts = rle.get("counts")
    if isinstance(counts, (str, bytes)):
        runs = string_counts(counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts)
    elif isinstance(counts, list) and all(is_int(v) for v in counts):
        runs = np.asarray(counts, dtype=np.int64)
        if (runs < 0).any():
            raise ValueError("RLE counts contain a negative run length")
    else:
        raise ValueError(f"RLE counts must be a string or a list of integers, got {short_repr(counts)}")
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE counts cover {int(runs.sum())} pixels, the {width}x{height} image has {height * width}")
    return runs


def segmentation_rle(segmentation, height: int, width: int) -> dict:
    """A COCO ``segmentation`` of a ``height x width`` image -> one compressed RLE dict
    (pycocotools' ``{"size", "counts": bytes}``). Polygon parts with fewer than 3 points are
    left out (pycocotools would read a 4-number part as a box); ValueError for anything
    beyond the module's bounds, before pycocotools allocates."""
    if isinstance(segmentation, dict):
        rle_counts(segmentation, height, width)
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    if not isinstance(segmentation, list):
        raise ValueError(f"a segmentation is a list of polygons or an RLE dict, got {short_repr(segmentation)}")
    parts = [polygon_points(part, height, width) for part in segmentation]
    check_outline(parts, height, width)
    parts = [p for p in parts if len(p) >= MIN_POLYGON_POINTS]
    if not parts:
        return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    return mask_utils.merge(mask_utils.frPyObjects([p.ravel().tolist() for p in parts], height, width))


def is_int(value) -> bool:
    """An integer that is not a bool (JSON's true/false are no counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def short_repr(value, limit: int = 40) -> str:
    """``repr`` of a value cut to ``limit`` characters, for one-line messages."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
