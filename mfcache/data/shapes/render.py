"""A deterministic synthetic instance-segmentation dataset, written as a real COCO dataset.

Each image shows 1-5 flat shapes of six categories (`CATEGORIES`, COCO ids 1..6) on a
textured background. The shapes are chosen so that a mask matters: most fill well under
three quarters of their box (rings, deep stars, crescents, L-shapes, plus signs,
triangles), they are rotated, scaled (about 15-60% of the image's short side), shaded
and sometimes striped, and their colour says nothing about their category.

Instances overlap. They are painted back to front and each annotation covers only the
visible pixels of its instance: its own pixels minus those of every instance painted
later. An instance that would keep less than `MIN_VISIBLE_FRACTION` of its pixels, or
fewer than `MIN_VISIBLE_PIXELS`, is not painted at all, so every painted shape pixel
belongs to exactly one annotation and masks never overlap. Roughly one image in
`CROWD_EVERY` also holds an ``iscrowd=1`` region: a group of 2-3 small shapes of one
category annotated together as one RLE mask (COCO evaluation ignores detections on it).

Layout written by `write_shapes_dataset`::

    out/train/000001.png ...      RGB PNGs, width and height each in [min_size, max_size]
    out/val/000001.png ...
    out/annotations/train.json    COCO: images, annotations, categories, info
    out/annotations/val.json

Segmentations are polygons (flat ``[x1, y1, x2, y2, ...]`` lists traced along pixel
edges of the visible mask, which pycocotools decodes back to exactly that mask) or
compressed RLE (``counts`` as str) for masks with holes, for crowd regions and for
about one other annotation in four. ``area`` is the visible pixel count and ``bbox``
the tight ``[x, y, w, h]`` box of the visible mask, in pixels, as floats.

Conventions: masks are ``bool [H, W]`` numpy arrays; boxes are ``[x, y, w, h]`` with
pixel ``(row r, col c)`` covering ``[c, c+1) x [r, r+1)``; images are ``uint8 [H, W, 3]``.

Determinism: the same arguments give byte-identical JSON and PNG files. Every image
draws from its own generator seeded by ``(seed, split, index)``, so train and val differ
and adding images to a split does not change the earlier ones. Change
`GENERATOR_VERSION` whenever the output for given arguments changes.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from mfcache.errors import MfcacheError

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "Instance",
    "generate_image",
    "image_annotations",
    "mask_to_polygons",
    "write_shapes_dataset",
]

GENERATOR_VERSION = "1"
CATEGORIES: tuple[str, ...] = ("ring", "star", "crescent", "ell", "cross", "triangle")

MIN_VISIBLE_FRACTION = 0.3  # drop an instance keeping less than this share of its pixels
MIN_VISIBLE_PIXELS = 30  # ... or fewer visible pixels than this
RLE_SHARE = 0.25  # share of hole-free annotations that are still written as RLE
CROWD_EVERY = 15  # one image per block of this many consecutive images gets a crowd
MAX_INSTANCES = 5
SIZE_RANGE = (0.15, 0.6)  # shape size as a share of the image's short side
MIN_SIZE = 32  # smallest allowed `min_size`

_SPLITS = ("train", "val")
_ELLIPSE_POINTS = 48


@dataclass(frozen=True)
class Instance:
    """One annotated region of a generated image.

    mask: bool [H, W], the visible pixels (never overlaps another instance's mask).
    category_id: COCO category id, 1..len(CATEGORIES).
    iscrowd: True for a crowd region (a group of small shapes annotated together).
    """

    mask: np.ndarray
    category_id: int
    iscrowd: bool = False


@dataclass(frozen=True)
class _Layer:
    """A shape (or crowd group) before occlusion: `own` is all its in-image pixels."""

    own: np.ndarray
    category_id: int
    iscrowd: bool


# --------------------------------------------------------------------------------------
# Geometry: shape outlines and masks
# --------------------------------------------------------------------------------------


def _place(points: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """Rotate local `points` [N, 2] (x, y) by `angle` radians and move them to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    x = points[:, 0] * c - points[:, 1] * s + cx
    y = points[:, 0] * s + points[:, 1] * c + cy
    return list(zip(x.tolist(), y.tolist()))


def _ellipse(rx: float, ry: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Local outline [N, 2] of an axis-aligned ellipse centred at (dx, dy)."""
    t = np.linspace(0.0, 2.0 * math.pi, _ELLIPSE_POINTS, endpoint=False)
    return np.stack([dx + rx * np.cos(t), dy + ry * np.sin(t)], axis=1)


def _shape_outlines(rng: np.random.Generator, name: str, r: float) -> list[tuple[np.ndarray, int]]:
    """Local outlines of one shape of radius `r`, as (polygon [N, 2], fill) draw steps.

    Steps are drawn in order; fill 1 adds pixels, fill 0 cuts them away again.
    """
    if name == "ring":
        ry = r * rng.uniform(0.65, 1.0)
        k = rng.uniform(0.45, 0.7)
        return [(_ellipse(r, ry), 1), (_ellipse(r * k, ry * k), 0)]
    if name == "star":
        n = int(rng.integers(5, 8))
        inner = r * rng.uniform(0.35, 0.55)
        t = np.arange(2 * n) * math.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, r, inner)
        return [(np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1), 1)]
    if name == "crescent":
        ry = r * rng.uniform(0.8, 1.0)
        cut = rng.uniform(0.75, 0.95)
        shift = r * rng.uniform(0.35, 0.6)
        return [(_ellipse(r, ry), 1), (_ellipse(r * cut, ry * cut, dx=shift), 0)]
    if name == "ell":
        w, h = 2 * r, 2 * r * rng.uniform(0.7, 1.0)
        t = 2 * r * rng.uniform(0.25, 0.4)
        pts = np.array([(0, 0), (t, 0), (t, h - t), (w, h - t), (w, h), (0, h)], float)
        return [(pts - [w / 2, h / 2], 1)]
    if name == "cross":
        a, b = r, r * rng.uniform(0.7, 1.0)  # arm half-lengths
        t = r * rng.uniform(0.2, 0.35)  # arm half-thickness
        pts = np.array(
            [(-t, -b), (t, -b), (t, -t), (a, -t), (a, t), (t, t),
             (t, b), (-t, b), (-t, t), (-a, t), (-a, -t), (-t, -t)],
            float,
        )
        return [(pts, 1)]
    if name == "triangle":
        t = math.pi / 2 + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.35, 0.35, 3)
        rad = r * rng.uniform(0.8, 1.0, 3)
        return [(np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1), 1)]
    raise ValueError(f"unknown shape {name!r}")


def _draw_shape(
    rng: np.random.Generator,
    category_id: int,
    height: int,
    width: int,
    size: float,
    cx: float,
    cy: float,
) -> np.ndarray:
    """Rasterise one randomly rotated shape of diameter ~`size` at (cx, cy): bool [H, W]."""
    steps = _shape_outlines(rng, CATEGORIES[category_id - 1], size / 2)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for outline, fill in steps:
        draw.polygon(_place(outline, angle, cx, cy), fill=fill)
    return np.asarray(canvas, dtype=bool)


def _random_shape(rng: np.random.Generator, height: int, width: int) -> _Layer | None:
    """One shape of a random category, size, position and rotation; None if too small."""
    short = min(height, width)
    for _ in range(8):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        size = max(rng.uniform(*SIZE_RANGE) * short, 12.0)
        cx = rng.uniform(0.25 * size, max(width - 0.25 * size, 0.25 * size))
        cy = rng.uniform(0.25 * size, max(height - 0.25 * size, 0.25 * size))
        own = _draw_shape(rng, category_id, height, width, size, cx, cy)
        if own.sum() >= 2 * MIN_VISIBLE_PIXELS:
            return _Layer(own, category_id, False)
    return None


def _random_crowd(rng: np.random.Generator, height: int, width: int) -> _Layer | None:
    """A group of 2-3 small shapes of one category, as one crowd layer; None if too small."""
    short = min(height, width)
    category_id = int(rng.integers(1, len(CATEGORIES) + 1))
    spread = 0.18 * short
    gx = rng.uniform(spread, width - spread)
    gy = rng.uniform(spread, height - spread)
    count = int(rng.integers(2, 4))
    start = rng.uniform(0.0, 2.0 * math.pi)
    own = np.zeros((height, width), dtype=bool)
    for k in range(count):  # spread around the group's centre so they barely overlap
        angle = start + 2.0 * math.pi * k / count
        dist = spread * rng.uniform(0.6, 1.0)
        size = max(rng.uniform(0.08, 0.15) * short, 10.0)
        cx, cy = gx + dist * math.cos(angle), gy + dist * math.sin(angle)
        own |= _draw_shape(rng, category_id, height, width, size, cx, cy)
    if own.sum() < 2 * MIN_VISIBLE_PIXELS:
        return None
    return _Layer(own, category_id, True)


def _resolve_occlusion(layers: Sequence[_Layer]) -> list[tuple[_Layer, np.ndarray]]:
    """Keep the layers that stay visible enough, back to front, with their visible masks.

    Walks from the front layer backwards: a layer's visible mask is its own pixels minus
    those of every kept layer in front of it. A dropped layer is never painted, so it
    hides nothing.
    """
    height, width = layers[0].own.shape
    covered = np.zeros((height, width), dtype=bool)
    kept: list[tuple[_Layer, np.ndarray]] = []
    for layer in reversed(layers):
        visible = layer.own & ~covered
        n_visible = int(visible.sum())
        if n_visible >= MIN_VISIBLE_PIXELS and n_visible >= MIN_VISIBLE_FRACTION * layer.own.sum():
            kept.append((layer, visible))
            covered |= layer.own
    kept.reverse()
    return kept


# --------------------------------------------------------------------------------------
# Appearance: backgrounds and shape textures
# --------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth random field in about [0, 1], float32 [H, W], from a `cells`-wide grid."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    field = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(field), 0.0, 1.0)


def _stripes(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, lo: float, hi: float
) -> np.ndarray:
    """Soft stripes in [0, 1] with a random direction, phase and period in [lo, hi] px."""
    theta = rng.uniform(0.0, math.pi)
    period = rng.uniform(lo, hi)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    return 0.5 + 0.5 * np.sin(2.0 * math.pi * u / period + phase)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random RGB colour, float32 [3] in 0..255."""
    return rng.uniform(0.0, 255.0, 3).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured background, float32 [H, W, 3] in 0..255: two colours mixed by a pattern."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = rng.integers(4)
    t = _smooth_noise(rng, height, width, int(rng.integers(2, 9)))
    if pattern == 1:  # gradient
        theta = rng.uniform(0.0, 2.0 * math.pi)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        t = 0.4 * t + 0.6 * (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif pattern == 2:  # stripes
        t = 0.5 * t + 0.5 * _stripes(rng, yy, xx, 6.0, 40.0)
    elif pattern == 3:  # two noise scales
        t = 0.5 * t + 0.5 * _smooth_noise(rng, height, width, int(rng.integers(12, 24)))
    c1, c2 = _random_colour(rng), _random_colour(rng)
    image = c1 * (1.0 - t[..., None]) + c2 * t[..., None]
    image += rng.normal(0.0, rng.uniform(3.0, 10.0), image.shape).astype(np.float32)
    return image


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that differs clearly from `under` [N, 3], the pixels it will cover."""
    reference = under.mean(axis=0)
    best, best_gap = _random_colour(rng), -1.0
    for _ in range(8):
        colour = _random_colour(rng)
        gap = float(np.linalg.norm(colour - reference))
        if gap > best_gap:
            best, best_gap = colour, gap
        if gap >= 90.0:
            break
    return best


def _paint(rng: np.random.Generator, image: np.ndarray, own: np.ndarray) -> None:
    """Paint a shaded, sometimes striped shape onto `image` (float [H, W, 3]) where `own`."""
    rows, cols = np.nonzero(own)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    region = image[r0:r1, c0:c1]
    mask = own[r0:r1, c0:c1]
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    base = _pick_colour(rng, region[mask])
    # Linear shading across the shape.
    theta = rng.uniform(0.0, 2.0 * math.pi)
    extent = max(r1 - r0, c1 - c0, 1)
    u = ((xx - xx.mean()) * math.cos(theta) + (yy - yy.mean()) * math.sin(theta)) / extent
    colour = base * (1.0 + rng.uniform(0.2, 0.7) * u)[..., None]
    # Sometimes a second colour in stripes or blotches.
    texture = rng.integers(3)
    if texture:
        other = _random_colour(rng)
        if texture == 1:
            w = _stripes(rng, yy, xx, 4.0, 16.0)
        else:
            w = _smooth_noise(rng, r1 - r0, c1 - c0, int(rng.integers(2, 6)))
        w = rng.uniform(0.2, 0.5) * w[..., None]
        colour = colour * (1.0 - w) + other * w
    colour += rng.normal(0.0, rng.uniform(2.0, 8.0), colour.shape).astype(np.float32)
    region[mask] = colour[mask]


def generate_image(
    rng: np.random.Generator, width: int, height: int, *, crowd: bool = False
) -> tuple[np.ndarray, list[Instance]]:
    """Draw one image and its instances with `rng`.

    Returns (image uint8 [H, W, 3], instances back to front). Instance masks are the
    visible pixels and are pairwise disjoint. With `crowd`, one extra crowd region is
    placed at a random depth (it may still be dropped if it ends up mostly hidden).
    """
    image = _background(rng, height, width)
    layers = [
        layer
        for _ in range(int(rng.integers(1, MAX_INSTANCES + 1)))
        if (layer := _random_shape(rng, height, width)) is not None
    ]
    if crowd and (group := _random_crowd(rng, height, width)) is not None:
        layers.insert(int(rng.integers(0, len(layers) + 1)), group)
    instances: list[Instance] = []
    if layers:
        for layer, visible in _resolve_occlusion(layers):
            _paint(rng, image, layer.own)
            instances.append(Instance(visible, layer.category_id, layer.iscrowd))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), instances


# --------------------------------------------------------------------------------------
# Masks to COCO segmentations
# --------------------------------------------------------------------------------------


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x, y, w, h) of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


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
            previous, current = current, (
                following.pop(current) if current in following else saddles.pop((current, step))
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
    return drawn["counts"] == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.5) -> list[list[float]] | None:
    """Exact COCO polygons for a bool [H, W] mask, or None if it has holes.

    Traces the pixel-edge boundary of each 4-connected part (one flat [x1, y1, ...]
    list each, pixel-corner coordinates) and drops vertices within `tolerance` px of
    the outline where pycocotools still decodes the result to exactly `mask`.
    """
    if not mask.any():
        return None
    x, y, w, h = _mask_bbox(mask)
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


def _mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a bool [H, W] mask, `counts` as str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    height, width = (int(v) for v in rle["size"])
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def image_annotations(
    rng: np.random.Generator, instances: Sequence[Instance], image_id: int, first_id: int
) -> list[dict]:
    """COCO annotation dicts for `instances`, with ids first_id, first_id + 1, ...

    Crowd regions, masks with holes and about `RLE_SHARE` of the rest are RLE; all other
    masks are polygons. `area` is the visible pixel count, `bbox` its tight xywh box.
    """
    annotations = []
    for offset, inst in enumerate(instances):
        use_rle = bool(rng.random() < RLE_SHARE) or inst.iscrowd
        polygons = None if use_rle else mask_to_polygons(inst.mask)
        annotations.append(
            {
                "id": first_id + offset,
                "image_id": image_id,
                "category_id": inst.category_id,
                "segmentation": polygons if polygons is not None else _mask_to_rle(inst.mask),
                "area": int(np.count_nonzero(inst.mask)),
                "bbox": [float(v) for v in _mask_bbox(inst.mask)],
                "iscrowd": int(inst.iscrowd),
            }
        )
    return annotations


# --------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The generator for image `index` (0-based) of split number `split`."""
    return np.random.default_rng([seed, split, 0, index])


def _has_crowd(seed: int, split: int, index: int) -> bool:
    """True for exactly one image in each block of `CROWD_EVERY` consecutive images."""
    block_rng = np.random.default_rng([seed, split, 1, index // CROWD_EVERY])
    return index % CROWD_EVERY == int(block_rng.integers(CROWD_EVERY))


def _atomic_write(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `path` via a temporary file in the same directory and os.replace.

    A killed run leaves either the old file or the new one, never a partial one.
    `durable` also syncs the data to disk before the rename (used for the JSON files).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 [H, W, 3] image."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(
    out: Path,
    split: str,
    count: int,
    *,
    seed: int,
    min_size: int,
    max_size: int,
    progress: Callable[[int], None] | None,
) -> tuple[Path, Path]:
    """Write one split's PNGs, then its COCO JSON. Returns (json path, image dir)."""
    split_code = _SPLITS.index(split)
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = _image_rng(seed, split_code, index)
        width = int(rng.integers(min_size, max_size + 1))
        height = int(rng.integers(min_size, max_size + 1))
        crowd = _has_crowd(seed, split_code, index)
        pixels, instances = generate_image(rng, width, height, crowd=crowd)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        _atomic_write(image_dir / file_name, _png_bytes(pixels))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        annotations += image_annotations(rng, instances, image_id, len(annotations) + 1)
        if progress is not None:
            progress(1)
    coco = {
        "info": {
            "description": "mfcache synthetic shapes",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "split": split,
            "num_images": count,
            "min_size": min_size,
            "max_size": max_size,
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(CATEGORIES)
        ],
    }
    json_path = out / "annotations" / f"{split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(json_path, json.dumps(coco, separators=(",", ":")).encode("utf-8"), durable=True)
    return json_path, image_dir


def write_shapes_dataset(
    out: str | Path,
    *,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    min_size: int = 128,
    max_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Path]:
    """Write the synthetic shapes dataset as COCO under `out`.

    Writes out/train/*.png, out/val/*.png, out/annotations/train.json and
    out/annotations/val.json (each JSON only after all of its split's images). Returns
    {"train": train json, "val": val json, "train_images": dir, "val_images": dir}.
    `progress(n)` is called with the number of images just written. Rewriting an
    existing dataset is safe; same arguments give byte-identical files.
    """
    if num_train < 0 or num_val < 0:
        raise MfcacheError(
            f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}"
        )
    if seed < 0:
        raise MfcacheError(f"seed must be >= 0, got {seed}")
    if not MIN_SIZE <= min_size <= max_size:
        raise MfcacheError(
            f"need {MIN_SIZE} <= min_size <= max_size, "
            f"got min_size={min_size}, max_size={max_size}"
        )
    out = Path(out)
    paths: dict[str, Path] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        json_path, image_dir = _write_split(
            out, split, count, seed=seed, min_size=min_size, max_size=max_size, progress=progress
        )
        paths[split], paths[f"{split}_images"] = json_path, image_dir
    return paths
