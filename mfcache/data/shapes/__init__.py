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

Modules: `render` draws one image and its instances, `polygons` turns masks into COCO
segmentations (polygons, RLE, boxes), `write` writes the annotations, PNGs and JSON.
"""

from mfcache.data.shapes.polygons import mask_to_polygons
from mfcache.data.shapes.render import (
    CATEGORIES,
    CROWD_EVERY,
    GENERATOR_VERSION,
    MAX_INSTANCES,
    MIN_SIZE,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    SIZE_RANGE,
    Instance,
    generate_image,
)
from mfcache.data.shapes.write import RLE_SHARE, image_annotations, write_shapes_dataset

__all__ = [
    "CATEGORIES",
    "CROWD_EVERY",
    "GENERATOR_VERSION",
    "MAX_INSTANCES",
    "MIN_SIZE",
    "MIN_VISIBLE_FRACTION",
    "MIN_VISIBLE_PIXELS",
    "RLE_SHARE",
    "SIZE_RANGE",
    "Instance",
    "generate_image",
    "image_annotations",
    "mask_to_polygons",
    "write_shapes_dataset",
]
