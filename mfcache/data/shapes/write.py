"""Writing the shapes dataset: per-image COCO annotations, PNGs and one COCO JSON per split.

Image `index` of a split draws everything (size, shapes, paint, annotation formats)
from its own generator seeded by ``(seed, split, index)``; whether it gets a crowd
region comes from a second generator per block of `CROWD_EVERY` images. Every file is
written atomically (temporary file, then rename).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mfcache.data.shapes.polygons import mask_bbox, mask_to_polygons, mask_to_rle
from mfcache.data.shapes.render import (
    CATEGORIES,
    CROWD_EVERY,
    GENERATOR_VERSION,
    MIN_SIZE,
    Instance,
    generate_image,
)
from mfcache.errors import MfcacheError

__all__ = ["RLE_SHARE", "image_annotations", "write_shapes_dataset"]

RLE_SHARE = 0.25  # share of hole-free annotations that are still written as RLE

_SPLITS = ("train", "val")

# --------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------


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
                "segmentation": polygons if polygons is not None else mask_to_rle(inst.mask),
                "area": int(np.count_nonzero(inst.mask)),
                "bbox": [float(v) for v in mask_bbox(inst.mask)],
                "iscrowd": int(inst.iscrowd),
            }
        )
    return annotations


def _coco_document(
    split: str,
    images: list[dict],
    annotations: list[dict],
    *,
    seed: int,
    min_size: int,
    max_size: int,
) -> dict:
    """The COCO JSON object of one split: info, images, annotations, categories."""
    return {
        "info": {
            "description": "mfcache synthetic shapes",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "split": split,
            "num_images": len(images),
            "min_size": min_size,
            "max_size": max_size,
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)],
    }


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Splits and the dataset
# --------------------------------------------------------------------------------------


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """The generator for image `index` (0-based) of split number `split`."""
    return np.random.default_rng([seed, split, 0, index])


def _has_crowd(seed: int, split: int, index: int) -> bool:
    """True for exactly one image in each block of `CROWD_EVERY` consecutive images."""
    block_rng = np.random.default_rng([seed, split, 1, index // CROWD_EVERY])
    return index % CROWD_EVERY == int(block_rng.integers(CROWD_EVERY))


def _write_image(
    image_dir: Path,
    split_code: int,
    index: int,
    first_id: int,
    *,
    seed: int,
    min_size: int,
    max_size: int,
) -> tuple[dict, list[dict]]:
    """Draw image `index` and write its PNG. Returns (COCO image record, its annotations).

    Annotation ids start at `first_id`; the image id is ``index + 1``.
    """
    rng = _image_rng(seed, split_code, index)
    width = int(rng.integers(min_size, max_size + 1))
    height = int(rng.integers(min_size, max_size + 1))
    crowd = _has_crowd(seed, split_code, index)
    pixels, instances = generate_image(rng, width, height, crowd=crowd)
    image_id = index + 1
    file_name = f"{image_id:06d}.png"
    _atomic_write(image_dir / file_name, _png_bytes(pixels))
    record = {"id": image_id, "file_name": file_name, "width": width, "height": height}
    return record, image_annotations(rng, instances, image_id, first_id)


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
    settings = {"seed": seed, "min_size": min_size, "max_size": max_size}
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        record, anns = _write_image(image_dir, _SPLITS.index(split), index, len(annotations) + 1, **settings)
        images.append(record)
        annotations += anns
        if progress is not None:
            progress(1)
    coco = _coco_document(split, images, annotations, **settings)
    json_path = out / "annotations" / f"{split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(json_path, json.dumps(coco, separators=(",", ":")).encode("utf-8"), durable=True)
    return json_path, image_dir


def _check_arguments(num_train: int, num_val: int, seed: int, min_size: int, max_size: int) -> None:
    """Raise MfcacheError for negative counts or seed, or sizes outside MIN_SIZE..max."""
    if num_train < 0 or num_val < 0:
        raise MfcacheError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if seed < 0:
        raise MfcacheError(f"seed must be >= 0, got {seed}")
    if not MIN_SIZE <= min_size <= max_size:
        raise MfcacheError(f"need {MIN_SIZE} <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")


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
    _check_arguments(num_train, num_val, seed, min_size, max_size)
    out = Path(out)
    paths: dict[str, Path] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        json_path, image_dir = _write_split(
            out, split, count, seed=seed, min_size=min_size, max_size=max_size, progress=progress
        )
        paths[split], paths[f"{split}_images"] = json_path, image_dir
    return paths
