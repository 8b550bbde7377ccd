"""Creating a cache split and writing it block by block.

A *block* is ``block_size`` consecutive images. Regular arrays are chunked by block and
every image starts on a chunk boundary of the ragged arrays, so a block's write covers
whole chunks that no other block touches; ``index/done`` is written only after a block's
data, so a killed run leaves at worst a block that reads as not done and is redone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from mfcache.cache.schema import (
    IMAGE_ARRAYS,
    RAGGED_ARRAYS,
    SplitPlan,
    fingerprint_mismatch,
    packed_bytes,
)
from mfcache.errors import MfcacheError


@dataclass
class ImageRecord:
    """One image's outputs, ready to store (numpy, storage dtypes).

    queries [K, D]; boxes [K, 4] xyxy input px; scores, labels, query_index [K];
    gt_id, gt_iou [K]; target_masks [K, B] packed bits;
    memory [T, D] valid tokens of all levels; c1 [P, C] or None.
    """

    queries: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    query_index: np.ndarray
    gt_id: np.ndarray
    gt_iou: np.ndarray
    target_masks: np.ndarray
    memory: np.ndarray
    c1: np.ndarray | None


def open_root(path: Path, fingerprint: dict) -> zarr.Group:
    """Open (or create) a cache root, refusing one made with anything else."""
    if path.exists() and not (path / "zarr.json").exists():
        raise MfcacheError(f"{path} exists and is not an mfcache cache; choose another --out")
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    stored = root.attrs.get("mfcache")
    if stored is None:
        root.attrs["mfcache"] = fingerprint
        return root
    problem = fingerprint_mismatch(stored, fingerprint)
    if problem:
        raise MfcacheError(f"cache {path} was made with {problem}; use another --out")
    return root


def create_split(
    root: zarr.Group, name: str, plan: SplitPlan, *, meta: dict, annotations: bytes,
    topk: int, d_model: int, c1_channels: int, target_size: int, block_size: int, dtype: str,
) -> zarr.Group:
    """Create split ``name`` with every array allocated and the index written, or reopen
    it if it was made from the same annotations. ``meta`` lands in the split's attrs."""
    if name in root:
        group = root[name]
        if group.attrs.get("ready"):
            if group.attrs.get("annotations_sha256") != meta["annotations_sha256"]:
                raise MfcacheError(
                    f"split {name!r} of this cache was made from another annotation file "
                    f"({group.attrs.get('annotation_file')}); use another --split or --out"
                )
            return group
        # A killed creation left a partial layout and no data: start it again.
        shutil.rmtree(Path(root.store.root) / name)
    group = root.create_group(name)
    n = plan.num_images
    dims = {"K": topk, "D": d_model, "C": c1_channels, "L": plan.level_hw.shape[1], "B": packed_bytes(target_size)}
    for array_name, (array_dtype, trailing, _) in IMAGE_ARRAYS.items():
        shape = (n, *(dims[t] if isinstance(t, str) else t for t in trailing))
        group.create_array(
            array_name, shape=shape, chunks=(min(block_size, max(n, 1)), *shape[1:]),
            dtype=array_dtype or dtype, fill_value=0, compressors=None,
        )
    group.create_array("memory", shape=(int(plan.token_offset[-1]), d_model),
                       chunks=(plan.chunk_tokens, d_model), dtype=dtype, fill_value=0, compressors=None)
    if c1_channels:
        group.create_array("c1", shape=(int(plan.c1_offset[-1]), c1_channels),
                           chunks=(plan.c1_chunk, c1_channels), dtype=dtype, fill_value=0, compressors=None)
    group.create_array("annotations", shape=(len(annotations),), chunks=(1 << 24,), dtype="uint8",
                       compressors=BloscCodec(cname="zstd", clevel=3))
    group["annotations"][:] = np.frombuffer(annotations, dtype=np.uint8)
    for key, values in {
        "index/image_id": plan.image_id, "index/orig_hw": plan.orig_hw, "index/input_hw": plan.input_hw,
        "index/level_hw": plan.level_hw, "index/token_offset": plan.token_offset[:-1],
        "index/c1_offset": plan.c1_offset[:-1],
    }.items():
        group[key][:] = values
    group.attrs.update({
        **meta, "chunk_tokens": plan.chunk_tokens, "c1_chunk": plan.c1_chunk, "block_size": block_size,
        "num_images": n, "ready": True,
    })
    return group


class BlockWriter:
    """Writes whole blocks of images into a split created by :func:`create_split`."""

    def __init__(self, group: zarr.Group):
        self.group = group
        self.token_offset = np.append(group["index/token_offset"][:], group["memory"].shape[0])
        self.has_c1 = "c1" in group
        if self.has_c1:
            self.c1_offset = np.append(group["index/c1_offset"][:], group["c1"].shape[0])

    def write(self, start: int, records: list[ImageRecord]) -> None:
        """Store images ``start .. start + len(records)``, data first, then their done flags."""
        stop = start + len(records)
        fields = {
            "queries": "queries", "boxes": "boxes", "scores": "scores", "labels": "labels",
            "query_index": "query_index", "targets/gt_id": "gt_id", "targets/gt_iou": "gt_iou",
            "targets/masks": "target_masks",
        }
        for array_name, attr in fields.items():
            self.group[array_name][start:stop] = np.stack([getattr(r, attr) for r in records])
        self._write_ragged("memory", self.token_offset, start, [r.memory for r in records])
        if self.has_c1:
            self._write_ragged("c1", self.c1_offset, start, [r.c1 for r in records])
        self.group["index/done"][start:stop] = 1

    def _write_ragged(self, name: str, offsets: np.ndarray, start: int, rows: list[np.ndarray]) -> None:
        # One write spanning the block's chunks, padding included, so no chunk is written twice.
        array = self.group[name]
        lo, hi = int(offsets[start]), int(offsets[start + len(rows)])
        buffer = np.zeros((hi - lo, array.shape[1]), dtype=array.dtype)
        for i, part in enumerate(rows):
            at = int(offsets[start + i]) - lo
            limit = int(offsets[start + i + 1]) - lo
            if at + len(part) > limit:
                raise MfcacheError(f"{name} of image #{start + i} has {len(part)} rows, planned {limit - at}")
            buffer[at: at + len(part)] = part
        array[lo:hi] = buffer

