"""COCO segmentations of bool [H, W] masks: tight boxes, exact polygons and compressed RLE.

`mask_to_polygons` traces the pixel-edge boundary of each 4-connected part of a mask,
simplifies it (Douglas-Peucker) only as far as pycocotools still decodes the polygons
to exactly that mask, and gives up (None) on masks with holes. `mask_to_rle` is
pycocotools' own compressed RLE with ``counts`` as str, ready for JSON.

Boxes are ``[x, y, w, h]`` with pixel ``(row r, col c)`` covering ``[c, c+1) x [r, r+1)``.
"""

from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["mask_bbox", "mask_to_polygons", "mask_to_rle"]


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x, y, w, h) of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a bool [H, W] mask: {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    height, width = (int(v) for v in rle["size"])
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _boundary_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Closed loops [N, 2] of pixel-corner (x, y) points along the mask's pixel edges.

    Loops run with the mask on their right (y down), so outer boundaries have positive
    shoelace area and hole boundaries negative. Where two pixels touch only diagonally
    the loop turns tightly around each, so the pieces get separate loops (mask parts are
    4-connected, holes 8-connected).
    """
    p = np.pad(mask, 1)
    core = p[1:-1, 1:-1]
    stride = p.shape[1] + 1
    r, c = np.nonzero(core & ~p[:-2, 1:-1])  # top edges, heading east
    starts, ends = [r * stride + c], [r * stride + c + 1]
    r, c = np.nonzero(core & ~p[1:-1, 2:])  # right edges, heading south
    starts.append(r * stride + c + 1), ends.append((r + 1) * stride + c + 1)
    r, c = np.nonzero(core & ~p[2:, 1:-1])  # bottom edges, heading west
    starts.append((r + 1) * stride + c + 1), ends.append((r + 1) * stride + c)
    r, c = np.nonzero(core & ~p[1:-1, :-2])  # left edges, heading north
    starts.append((r + 1) * stride + c), ends.append(r * stride + c)
    start, end = np.concatenate(starts), np.concatenate(ends)
    vertices, counts = np.unique(start, return_counts=True)
    at_saddle = np.isin(start, vertices[counts > 1])  # two edges leave a saddle vertex
    following = dict(zip(start[~at_saddle].tolist(), end[~at_saddle].tolist()))
    saddles = {(a, b - a): b for a, b in zip(start[at_saddle].tolist(), end[at_saddle].tolist())}
    right_turn = {1: stride, stride: -1, -1: -stride, -stride: 1}  # east->south->west->north
    loops = []
    while following or saddles:
        if following:
            first, current = following.popitem()
            first_step = None
        else:
            (first, first_step), current = saddles.popitem()
        loop, previous = [first], first
        while True:
            step = right_turn[current - previous]  # the tight turn, taken at saddles
            if current == first and (first_step is None or step == first_step):
                break
            loop.append(current)
            previous, current = (
                current,
                (following.pop(current) if current in following else saddles.pop((current, step))),
            )
        codes = np.asarray(loop)
        loops.append(np.stack([codes % stride, codes // stride], axis=1))
    return loops


def _drop_collinear(loop: np.ndarray) -> np.ndarray:
    """Keep only the corners of a closed axis-aligned loop [N, 2]."""
    incoming = loop - np.roll(loop, 1, axis=0)
    outgoing = np.roll(loop, -1, axis=0) - loop
    return loop[np.any(incoming != outgoing, axis=1)]


def _simplify_chain(chain: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of an open chain [N, 2]; keeps both ends."""
    points = chain.astype(float)
    keep = np.zeros(len(chain), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(chain) - 1)]
    while stack:
        i, k = stack.pop()
        if k <= i + 1:
            continue
        a, b, between = points[i], points[k], points[i + 1 : k]
        dx, dy = b - a
        length = math.hypot(dx, dy)
        if length == 0.0:
            dist = np.hypot(*(between - a).T)
        else:
            dist = np.abs(dx * (between[:, 1] - a[1]) - dy * (between[:, 0] - a[0])) / length
        j = int(dist.argmax())
        if dist[j] > tolerance:
            keep[i + 1 + j] = True
            stack += [(i, i + 1 + j), (i + 1 + j, k)]
    return chain[keep]


def _simplify_loop(loop: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed loop, split at its first point and the point farthest off."""
    if len(loop) <= 4:
        return loop
    far = int(((loop - loop[0]) ** 2).sum(axis=1).argmax())
    first = _simplify_chain(loop[: far + 1], tolerance)
    second = _simplify_chain(np.vstack([loop[far:], loop[:1]]), tolerance)
    simple = np.vstack([first[:-1], second[:-1]])
    return simple if len(simple) >= 3 else loop


def _polygons_match(polygons: list[list[float]], mask: np.ndarray) -> bool:
    """True if pycocotools rasterises `polygons` to exactly the bool [H, W] `mask`.

    Compares compressed RLE strings, which are canonical, so nothing needs decoding.
    """
    height, width = mask.shape
    drawn = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return drawn["counts"].decode("ascii") == mask_to_rle(mask)["counts"]


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.5) -> list[list[float]] | None:
    """Exact COCO polygons for a bool [H, W] mask, or None if it has holes.

    Traces the pixel-edge boundary of each 4-connected part (one flat [x1, y1, ...]
    list each, pixel-corner coordinates) and drops vertices within `tolerance` px of
    the outline where pycocotools still decodes the result to exactly `mask`.
    """
    if not mask.any():
        return None
    x, y, w, h = mask_bbox(mask)
    outlines = []
    for loop in _boundary_loops(mask[y : y + h, x : x + w]):
        corners = _drop_collinear(loop)
        xs, ys = corners[:, 0], corners[:, 1]
        if np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys) <= 0:  # a hole
            return None
        outlines.append(corners + (x, y))
    for simplify in (True, False):
        loops = [_simplify_loop(o, tolerance) for o in outlines] if simplify else outlines
        polygons = [[float(v) for v in loop.reshape(-1)] for loop in loops]
        if _polygons_match(polygons, mask):
            return polygons
    return None
