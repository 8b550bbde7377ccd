"""Creating a cache split and writing it block by block.

A *block* is ``block_size`` consecutive images. Regular arrays are chunked by block and
every image starts on a chunk boundary of the ragged arrays, so a block's write covers
whole chunks that no other block touches; ``index/done`` is written only after a block's
data and checksums, so a killed run leaves at worst a block that reads as not done and is
redone. The local store writes every file to a temporary name and renames it, so a kill
never leaves a half-written chunk or attribute file under its real name.
"""

from __future__ import annotations

import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from mfcache.cache.lease import check_out_prefix
from mfcache.cache.location import locate
from mfcache.cache.lock import check_out_folder
from mfcache.cache.records import ImageRecord
from mfcache.cache.schema import (
    CHECKSUM_ARRAYS,
    DONE,
    IMAGE_ARRAYS,
    INDEX_ARRAYS,
    SCALE_ARRAYS,
    SKIPPED,
    SplitPlan,
    checksum_parts,
    fingerprint_mismatch,
    image_checksums,
    memory_parts,
    packed_bytes,
    stored_levels,
)
from mfcache.errors import MfcacheError


def open_root(path, fingerprint: dict) -> zarr.Group:
    """Open (or create) a cache root (a folder or a :class:`~mfcache.cache.location.CacheLocation`),
    refusing one made with anything else. Writers hold the cache's lock
    (:mod:`mfcache.cache.lock`), whose file may be all the folder holds yet."""
    location = locate(path)
    if location.is_local:
        check_out_folder(location.path)
    else:
        check_out_prefix(location)
    root = location.open_group("a")
    stored = root.attrs.get("mfcache")
    if stored is None:
        root.attrs["mfcache"] = fingerprint
        return root
    problem = fingerprint_mismatch(stored, fingerprint)
    if problem:
        raise MfcacheError(f"cache {location} was made with {problem}; use another `extract.out`")
    return root


def stored_fingerprint(path) -> dict | None:
    """The fingerprint of the cache at ``path``, or None where there is no cache yet."""
    location = locate(path)
    if not location.is_cache():
        return None
    return location.open_group("r").attrs.get("mfcache")


def remove_partial_writes(root, split: str) -> int:
    """Delete the ``*.partial`` files that zarr's local store writes before renaming them
    over a file: a write killed midway leaves one behind (the file it was to replace is
    intact). Looks in the cache ``root`` itself (its metadata) and everywhere under
    ``root/split``; only safe while nothing writes there. Returns the number removed.
    Object stores write an object whole or not at all: nothing to remove there."""
    location = locate(root)
    if not location.is_local:
        return 0
    root = location.path
    stale = list(Path(root).glob("*.partial")) + list((Path(root) / split).rglob("*.partial"))
    for file in stale:
        file.unlink(missing_ok=True)
    return len(stale)


def create_split(
    root: zarr.Group,
    name: str,
    plan: SplitPlan,
    *,
    meta: dict,
    annotations: bytes,
    topk: int,
    d_model: int,
    c1_channels: int,
    target_size: int,
    block_size: int,
    dtype: str,
    compress: bool = False,
) -> zarr.Group:
    """Create split ``name`` with every array allocated and the index written, or reopen
    it if it was made from the same annotations. ``meta`` lands in the split's attrs.
    ``dtype`` int8 adds the scale arrays; ``compress`` blosc-compresses the feature arrays."""
    if name in root:
        group = root[name]
        if group.attrs.get("ready"):
            if group.attrs.get("annotations_sha256") != meta["annotations_sha256"]:
                raise MfcacheError(
                    f"split {name!r} of this cache was made from another annotation file "
                    f"({group.attrs.get('annotation_file')}); use another `split` or `extract.out`"
                )
            return group
        # A killed creation left a partial layout and no data: start it again.
        _remove_group(root, name)
    group = root.create_group(name)
    n = plan.num_rows
    num_levels = plan.level_hw.shape[1]
    dims = {
        "K": topk,
        "D": d_model,
        "C": c1_channels,
        "L": num_levels,
        "B": packed_bytes(target_size),
        "P": len(checksum_parts(num_levels)),
    }
    features = (
        (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=np.dtype(dtype).itemsize, blocksize=1 << 20),)
        if compress
        else None
    )
    arrays = dict(IMAGE_ARRAYS)
    if dtype == "int8":
        arrays.update(
            {
                k: ("float32", (trailing,), what)
                for k, (trailing, what) in SCALE_ARRAYS.items()
                if k != "scales/c1" or c1_channels
            }
        )
    for array_name, (array_dtype, trailing, _) in arrays.items():
        shape = (n, *(dims[t] if isinstance(t, str) else t for t in trailing))
        group.create_array(
            array_name,
            shape=shape,
            chunks=(min(block_size, max(n, 1)), *shape[1:]),
            dtype=array_dtype or dtype,
            fill_value=0,
            compressors=features if array_name == "queries" else None,
        )
    group.create_array(
        "memory",
        shape=(int(plan.token_offset[-1]), d_model),
        chunks=(plan.chunk_tokens, d_model),
        dtype=dtype,
        fill_value=0,
        compressors=features,
    )
    if c1_channels:
        group.create_array(
            "c1",
            shape=(int(plan.c1_offset[-1]), c1_channels),
            chunks=(plan.c1_chunk, c1_channels),
            dtype=dtype,
            fill_value=0,
            compressors=features,
        )
    group.create_array(
        "annotations",
        shape=(len(annotations),),
        chunks=(1 << 24,),
        dtype="uint8",
        compressors=BloscCodec(cname="zstd", clevel=3),
    )
    group["annotations"][:] = np.frombuffer(annotations, dtype=np.uint8)
    for key, values in {
        "index/image_id": plan.image_id,
        "index/orig_hw": plan.orig_hw,
        "index/input_hw": plan.input_hw,
        "index/level_hw": plan.level_hw,
        "index/token_offset": plan.token_offset[:-1],
        "index/c1_offset": plan.c1_offset[:-1],
    }.items():
        group[key].with_config({"write_empty_chunks": True})[:] = values  # every chunk file exists
    group.attrs.update(
        {
            **meta,
            "chunk_tokens": plan.chunk_tokens,
            "c1_chunk": plan.c1_chunk,
            "block_size": block_size,
            "num_images": n,
            "ready": True,
        }
    )
    return group


def _remove_group(root: zarr.Group, name: str) -> None:
    store = root.store
    if hasattr(store, "root"):  # a local folder
        shutil.rmtree(Path(store.root) / name)
    else:
        zarr.core.sync.sync(store.delete_dir(name))


class BlockWriter:
    """Writes whole blocks of images into a split created by :func:`create_split`.

    Every chunk of a block is written, even an all-zero one (zarr skips those by default),
    so a missing chunk file is always damage that ``mfcache verify`` can name.
    """

    FIELDS = {
        "queries": "queries",
        "boxes": "boxes",
        "scores": "scores",
        "labels": "labels",
        "query_index": "query_index",
        "targets/gt_id": "gt_id",
        "targets/gt_iou": "gt_iou",
        "targets/masks": "target_masks",
    }

    def __init__(self, group: zarr.Group):
        self.group = group
        self.index = {name: group[name][:] for name in INDEX_ARRAYS}
        self.token_offset = np.append(self.index["index/token_offset"], group["memory"].shape[0])
        self.has_c1 = "c1" in group
        self.scales = [name for name in SCALE_ARRAYS if name in group]
        self.num_levels = self.index["index/level_hw"].shape[1]
        self.dtypes = {
            name: np.dtype(group[name].dtype)  # checksums are of the stored values
            for name in [*self.FIELDS, "memory", *(["c1"] if self.has_c1 else [])]
        }
        root = zarr.open_group(store=group.store, mode="r", zarr_format=3)
        self.levels = stored_levels(root.attrs["mfcache"])  # detector levels in memory
        if self.has_c1:
            self.c1_offset = np.append(self.index["index/c1_offset"], group["c1"].shape[0])

    def _array(self, name: str) -> zarr.Array:
        return self.group[name].with_config({"write_empty_chunks": True})

    def write(self, start: int, records: list[ImageRecord | None], skipped: dict[int, str] | None = None) -> None:
        """Store images ``start .. start + len(records)``: data and checksums first, their
        done flags last. ``None`` records are skipped images (``skipped`` maps their
        position to the reason, kept in the split's attrs); their rows hold zeros."""
        stop = start + len(records)
        skipped = skipped or {}
        ids = self.index["index/image_id"]
        present = [r for r in records if r is not None]
        if len(present) + len(skipped) != len(records) or any(records[p - start] is not None for p in skipped):
            raise ValueError("skipped must name exactly the positions whose record is None")
        if skipped:  # reasons first: a done == 2 flag is never without its reason
            reasons = dict(self.group.attrs.get("skipped", {}))
            reasons.update({str(int(ids[p])): why for p, why in skipped.items()})
            self.group.attrs["skipped"] = reasons
        rows: list[dict[str, np.ndarray]] = []  # each image's checksum parts, in storage dtype
        for i, r in enumerate(records):
            rows.append({name: self.index[name][start + i] for name in CHECKSUM_ARRAYS if name in self.index})
            if r is not None:
                rows[-1].update(
                    {name: np.asarray(getattr(r, attr), dtype=self.dtypes[name]) for name, attr in self.FIELDS.items()}
                )
                rows[-1].update(
                    memory_parts(
                        np.asarray(r.memory, dtype=self.dtypes["memory"]),
                        self.index["index/level_hw"][start + i],
                        self.levels,
                    )
                )
                if self.has_c1:
                    rows[-1]["c1"] = np.asarray(r.c1, dtype=self.dtypes["c1"])
                rows[-1].update({name: np.asarray(r.scales[name], dtype=np.float32) for name in self.scales})
        for array_name, attr in self.FIELDS.items():
            array = self.group[array_name]
            template = np.zeros(array.shape[1:], dtype=array.dtype)
            self._array(array_name)[start:stop] = np.stack(
                [getattr(r, attr) if r is not None else template for r in records]
            )
        for name in self.scales:
            template = np.zeros(self.group[name].shape[1:], dtype=np.float32)
            self._array(name)[start:stop] = np.stack([r.scales[name] if r is not None else template for r in records])
        self._write_ragged("memory", self.token_offset, start, [r.memory if r is not None else None for r in records])
        if self.has_c1:
            self._write_ragged("c1", self.c1_offset, start, [r.c1 if r is not None else None for r in records])
        empty = np.zeros(self.group["index/checksum"].shape[1:], dtype=np.uint32)
        checksum = np.stack(
            [image_checksums(row, self.num_levels) if r is not None else empty for row, r in zip(rows, records)]
        )
        self._array("index/checksum")[start:stop] = checksum
        done = np.array([SKIPPED if r is None else DONE for r in records], dtype=np.uint8)
        self._array("index/done")[start:stop] = done
        self.index["index/done"][start:stop] = done
        retried = [str(int(ids[start + i])) for i, r in enumerate(records) if r is not None]
        reasons = self.group.attrs.get("skipped", {})
        if any(k in reasons for k in retried):  # an image skipped before has now been read
            self.group.attrs["skipped"] = {k: v for k, v in reasons.items() if k not in retried}

    def _write_ragged(self, name: str, offsets: np.ndarray, start: int, rows: list[np.ndarray | None]) -> None:
        # One write spanning the block's chunks, padding included, so no chunk is written twice.
        array = self._array(name)
        lo, hi = int(offsets[start]), int(offsets[start + len(rows)])
        buffer = np.zeros((hi - lo, array.shape[1]), dtype=array.dtype)
        for i, part in enumerate(rows):
            if part is None:
                continue
            at = int(offsets[start + i]) - lo
            limit = int(offsets[start + i + 1]) - lo
            if at + len(part) > limit:
                raise MfcacheError(f"{name} of image #{start + i} has {len(part)} rows, planned {limit - at}")
            buffer[at : at + len(part)] = part
        array[lo:hi] = buffer


class BackgroundWriter:
    """Runs ``write(*job)`` for submitted jobs on one thread, in order, behind a queue of
    ``depth`` jobs: the producer (the detector loop) waits only while the queue is full.

    Use as a context manager. Leaving the block finishes every queued job (so blocks done
    before an error are kept), then re-raises the first error the thread hit, unchanged
    (``write`` turns OS errors into one-line :class:`MfcacheError`). After an error the
    thread drops later jobs, and :meth:`submit` raises it at once. A killed process leaves
    at worst the block being written, which reads as not done (its flags are written last).
    """

    def __init__(self, write: Callable[..., None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._failed = False  # set for good by the first error: later jobs are dropped
        self._thread = threading.Thread(target=self._run, name="mfcache-block-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not self._failed:
                try:
                    self._write(*job)
                except BaseException as exc:  # handed to the producer thread
                    self._error, self._failed = exc, True

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, *job) -> None:
        """Queue ``write(*job)``; blocks while ``depth`` jobs are already waiting."""
        self._raise()
        self._queue.put(job)

    def close(self) -> None:
        """Finish every queued job and stop the thread; raise the first error it hit."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:  # the producer failed: keep what is queued, report the producer's error
            try:
                self.close()
            except BaseException:
                pass
