"""Drawing one synthetic shapes image: shape outlines, occlusion, background and paint.

`generate_image` draws 1-`MAX_INSTANCES` shapes of the `CATEGORIES` (plus, on request,
one crowd group) back to front on a textured background and returns the image with one
`Instance` per kept shape, its mask the shape's visible pixels. Everything is drawn
from the caller's generator, so the same generator state gives the same image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "1"  # bump whenever any module's output for given arguments changes
CATEGORIES: tuple[str, ...] = ("ring", "star", "crescent", "ell", "cross", "triangle")

MIN_VISIBLE_FRACTION = 0.3  # drop an instance keeping less than this share of its pixels
MIN_VISIBLE_PIXELS = 30  # ... or fewer visible pixels than this
CROWD_EVERY = 15  # one image per block of this many consecutive images gets a crowd
MAX_INSTANCES = 5
SIZE_RANGE = (0.15, 0.6)  # shape size as a share of the image's short side
MIN_SIZE = 32  # smallest allowed `min_size`

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
            [
                (-t, -b),
                (t, -b),
                (t, -t),
                (a, -t),
                (a, t),
                (t, t),
                (t, b),
                (-t, b),
                (-t, t),
                (-a, t),
                (-a, -t),
                (-t, -t),
            ],
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


def _stripes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, lo: float, hi: float) -> np.ndarray:
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
