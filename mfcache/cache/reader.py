"""Reading a cache: the RAM index, one image's arrays, and a torch Dataset of batches.

Nothing here imports detector code: training and evaluation read the cache alone.

Nothing is served that extraction did not write: the store refuses a missing chunk
instead of filling it in (:class:`~mfcache.cache.store.StrictStore`), every part an image
read serves is checked against its CRC-32 (``index/checksum``,
:func:`~mfcache.cache.schema.checksum`), and any damage (a lost, truncated or altered
chunk, unreadable metadata) is one :class:`MfcacheError` line naming the split, the array and the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from pycocotools.coco import COCO
from zarr.core.sync import sync as zarr_sync

from mfcache.cache.c1_stem import STEM_ARRAY, C1Recomputer
from mfcache.cache.location import CacheLocation, locate
from mfcache.cache.records import ImageRecord, served_sample
from mfcache.cache.sample import Batch, Sample
from mfcache.cache.schema import (
    DONE,
    INDEX_ARRAYS,
    QUANTIZED,
    SCHEMA_VERSION,
    SKIPPED,
    ExtractSettings,
    c1_size,
    checksum,
    checksum_parts,
)
from mfcache.cache.store import damage
from mfcache.checkpoint_io import files_trusted, trusting
from mfcache.data.views import view_rows
from mfcache.detectors.base import DetectorInfo
from mfcache.errors import MfcacheError


class Cache:
    """An mfcache cache, in a folder or in object storage (``path``: a path, a URL or a
    :class:`~mfcache.cache.location.CacheLocation`): its fingerprint and its splits.
    ``self.path`` is the folder (a ``Path``) or, in object storage, the location."""

    def __init__(self, path: str | Path | CacheLocation):
        self.location = locate(path)
        self.path = self.location.path if self.location.is_local else self.location
        self.location.check_reachable()
        if not self.location.is_cache():
            raise MfcacheError(f"no mfcache cache at {self.path} (run `mfcache extract` first)")
        self._fresh_root: zarr.Group | None = None
        try:
            self.root = zarr.open_group(store=self.location.strict_store(), mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises many types for a damaged store
            raise MfcacheError(f"cannot open cache {self.path}: {exc}") from None
        self.fingerprint = self.root.attrs.get("mfcache")
        if not self.fingerprint:
            raise MfcacheError(f"{self.path} is a Zarr group but not an mfcache cache")
        if self.fingerprint.get("schema_version") != SCHEMA_VERSION:
            raise MfcacheError(
                f"cache {self.path} has schema version {self.fingerprint.get('schema_version')}; "
                f"this mfcache reads version {SCHEMA_VERSION}: extract it again"
            )
        self.detector = DetectorInfo.from_dict(self.fingerprint["detector"])
        self.extract = self.fingerprint["extract"]
        self.settings = ExtractSettings.from_fingerprint(self.fingerprint)  # the extract options, typed

    @property
    def fresh_root(self) -> zarr.Group:
        """The root group read from object storage itself, replacing the read-through copies
        (:meth:`CacheSplit.read_many` re-reads an image through it when a local copy fails its checks)."""
        if self._fresh_root is None:
            self._fresh_root = zarr.open_group(store=self.location.strict_store(fresh=True), mode="r", zarr_format=3)
        return self._fresh_root

    @property
    def splits(self) -> list[str]:
        """The split folders, read from the disk rather than from zarr's listing, so one split
        with damaged metadata (refused when opened) hides neither itself nor the others."""
        names = []
        for folder in self.location.children():
            data = self.location.read(f"{folder}/zarr.json")
            if data is None or folder == STEM_ARRAY or folder.endswith(".tmp"):
                continue
            try:
                node_type = json.loads(data).get("node_type")
            except (ValueError, AttributeError):
                node_type = "group"  # damaged: listed, and refused with its reason when opened
            if node_type == "group":
                names.append(folder)
        return names

    def split(self, name: str | None = None, *, role: str = "train") -> CacheSplit:
        """Split ``name``; without a name, the only split or the one whose name starts
        with the role (``train``; ``val`` or ``test`` for evaluation). Evaluation never picks
        a ``train*`` split by itself: AP on the training images must be asked for by name."""
        splits = self.splits
        if not splits:
            raise MfcacheError(f"cache {self.path} holds no split yet (run `mfcache extract`)")
        if name is None:
            prefixes = ("train",) if role == "train" else ("val", "test")
            matches = [s for s in splits if s.startswith(prefixes)]
            if len(splits) == 1 and not (role == "eval" and splits[0].startswith("train")):
                matches = splits
            if role == "eval" and not matches and all(s.startswith("train") for s in splits):
                raise MfcacheError(
                    f"cache {self.path} has only training splits ({', '.join(splits)}): extract a val split to "
                    f"evaluate on, or pass `split` {splits[0]} to score the head on the images it trained on"
                )
            if len(matches) != 1:
                raise MfcacheError(f"cache {self.path} has splits {', '.join(splits)}: choose one with `split`")
            name = matches[0]
        if name not in splits:
            raise MfcacheError(f"cache {self.path} has no split {name!r} (it has {', '.join(splits)})")
        return CacheSplit(self, name)


class CacheSplit:
    """One split: the index in RAM (numpy arrays named as in the schema, without the
    ``index/`` prefix) and per-image reads."""

    concurrent = True  # _fetch: a batch's reads all in flight at once (benchmarks/run_all.py reader)
    checksums = True  # _check: CRC-32 of every part read; off only to measure its cost (benchmarks/)

    def __init__(self, cache: Cache, name: str):
        self.cache = cache
        self.name = name
        try:
            self.group = cache.root[name]
        except Exception as exc:  # zarr raises many types for damaged metadata
            raise MfcacheError(
                f"split {name!r} of {cache.path}: group metadata {name}/zarr.json "
                f"{damage(exc)}: the cache is damaged (mfcache verify {cache.path})"
            ) from None
        self.attrs = dict(self.group.attrs)
        if not self.attrs.get("ready"):
            raise MfcacheError(f"split {name!r} of {cache.path} was never fully created; run extract again")
        self._arrays: dict[str, zarr.Array] = {}
        self._fresh_arrays: dict[str, zarr.Array] = {}  # read past the read-through copies
        self.index = {key.split("/", 1)[1]: self._read_whole(key) for key in INDEX_ARRAYS}
        # column of each checksum part in index/checksum [N, P]
        self.part = {part: k for k, part in enumerate(checksum_parts(self.index["level_hw"].shape[1]))}
        self.label_to_category = np.asarray(self.attrs["label_to_category"], dtype=np.int64)
        # every result in one category, scored class-agnostic (mfcache.data.labels)
        self.class_agnostic = bool(self.attrs.get("class_agnostic", False))
        self.recompute_c1 = cache.settings.c1 == "recompute"  # made from the image at read time
        self.has_c1 = self._has("c1") or self.recompute_c1
        self._c1_recomputer = C1Recomputer(cache.location, cache.detector.preprocess) if self.recompute_c1 else None
        self._file_names: dict[int, str] | None = None
        self.target_size = cache.settings.target_size
        self.stored_levels = list(cache.settings.levels)  # detector level indices in memory
        self.scales = {name: scale for name, scale in QUANTIZED.items() if self._has(scale)}
        self.index["token_end"] = self.index["token_offset"] + self.index["level_hw"][:, self.stored_levels].prod(
            -1
        ).sum(-1)

    @property
    def num_rows(self) -> int:
        return len(self.index["image_id"])

    def view_rows(self, *, all_views: bool = False) -> np.ndarray:
        """``[M, views]`` or ``[M, 1]`` (view 0): each complete image's rows (:mod:`mfcache.data.views`)."""
        return view_rows(self.index["done"] == DONE, self.cache.settings.views, all_views=all_views)

    complete_rows = property(
        lambda self: self.view_rows()[:, 0],
        doc="[M] positions of the view-0 rows of the complete images: each image once.",
    )

    @property
    def skipped(self) -> dict[int, str]:
        """``{image_id: reason}`` of the images extraction skipped (``--skip-bad``): finished
        but absent, so training and evaluation leave them out."""
        reasons = self.attrs.get("skipped", {})
        ids = self.index["image_id"][self.index["done"] == SKIPPED]
        return {int(i): reasons.get(str(int(i)), "no reason recorded") for i in ids}

    @property
    def skipped_annotations(self) -> dict[int, str]:
        """``{annotation id: reason}`` of the annotations extraction left out of the stored
        annotation file (bad ones under ``--skip-bad``, ones marking no pixel)."""
        return {int(k): v for k, v in self.attrs.get("skipped_annotations", {}).items()}

    def require_complete(self) -> None:
        """Raise unless every image is written or skipped."""
        missing = int((self.index["done"] == 0).sum())
        if missing:
            raise MfcacheError(
                f"split {self.name!r} of {self.cache.path} is incomplete ({missing} of {self.num_rows} "
                "images missing): run the same `mfcache extract` command again to finish it"
            )

    def coco(self) -> COCO:
        """The split's ground truth, from the annotation file stored in the cache."""
        data = self._read_whole("annotations").tobytes()
        if (
            self.attrs.get("annotations_sha256")
            and hashlib.sha256(data).hexdigest() != self.attrs["annotations_sha256"]
        ):
            raise MfcacheError(
                f"split {self.name!r} of {self.cache.path}: array annotations does not match its "
                f"recorded sha256: the cache is damaged (mfcache verify {self.cache.path})"
            )
        coco = COCO()
        coco.dataset = json.loads(data)
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def image_path(self, i: int) -> Path:
        """The image file of position ``i``, as extraction read it (the split's image folder +
        its ``file_name`` in the stored annotations)."""
        if self._file_names is None:
            images = json.loads(self._read_whole("annotations").tobytes())["images"]
            self._file_names = {int(im["id"]): str(im["file_name"]) for im in images}
        folder = Path(self.attrs["images_dir"])
        if not folder.is_dir():
            raise MfcacheError(f"image folder {folder} is gone: this cache recomputes C1 from the images")
        return folder / self._file_names[int(self.index["image_id"][i])]

    def check_levels(self, levels: tuple[int, ...] | None) -> None:
        """Raise unless every detector level in ``levels`` (None = all) is stored."""
        missing = sorted(
            set(range(len(self.cache.detector.strides)) if levels is None else levels) - set(self.stored_levels)
        )
        if missing:
            raise MfcacheError(
                f"the head reads encoder levels {missing}, but cache {self.cache.path} stores only levels "
                f"{self.stored_levels} (`extract.levels`): extract again with them, or pick another head"
            )

    def _has(self, name: str) -> bool:
        """Whether the split stores array ``name`` (from the disk: damaged metadata is refused
        when the array is read, not taken for an absent array)."""
        return self.cache.location.has(f"{self.name}/{name}/zarr.json")

    def _damaged(self, name: str, what: str, i: int | None = None) -> MfcacheError:
        """The one-line error for damage found in array ``name`` (of image position ``i``)."""
        image = "" if i is None else f" of image id {int(self.index['image_id'][i])} (position {i})"
        return MfcacheError(
            f"split {self.name!r} of {self.cache.path}: array {name}{image}: {what}: "
            f"the cache is damaged (mfcache verify {self.cache.path} lists all damage)"
        )

    def array(self, name: str, i: int | None = None) -> zarr.Array:
        """Array ``name`` of the split, opened once (opening reads its metadata file); ``i``:
        the image position it is opened for (named if its metadata is damaged)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except Exception as exc:  # zarr raises many types for damaged metadata
                raise self._damaged(name, f"metadata {name}/zarr.json {damage(exc)}", i) from None
        return self._arrays[name]

    def _read_whole(self, name: str) -> np.ndarray:
        """All of array ``name`` (index arrays, annotations), refusing any damage."""
        try:
            return self.array(name)[:]
        except MfcacheError:
            raise
        except Exception as exc:
            raise self._damaged(name, damage(exc)) from None

    def _fetch(self, requests: dict, *, fresh: bool = False) -> dict:
        """``{key: (array name, selection)}`` -> ``{key: data}``, or the exception that read
        raised (see :meth:`_check`); with ``concurrent``, every read is in flight at once on
        zarr's event loop (one round trip per batch). ``fresh``: read from object storage,
        past (and replacing) the read-through copies."""
        array = self._fresh_array if fresh else self.array
        if not self.concurrent:
            out = {}
            for key, (name, sel) in requests.items():
                try:
                    out[key] = array(name)[sel]
                except MfcacheError:
                    raise
                except Exception as exc:
                    out[key] = exc
            return out
        reads = [array(name)._async_array.getitem(sel) for name, sel in requests.values()]
        return dict(zip(requests, zarr_sync(_gather(reads))))

    def _fresh_array(self, name: str) -> zarr.Array:
        if name not in self._fresh_arrays:
            self._fresh_arrays[name] = self.cache.fresh_root[self.name][name]
        return self._fresh_arrays[name]

    def _check(self, plan: ReadPlan, data: dict) -> None:
        """Raise unless every part image ``plan.position`` read is exactly what extraction wrote:
        each read succeeded (no missing, truncated or undecodable chunk) and each part's
        CRC-32 equals its ``index/checksum`` entry. ``memory`` is checked per stored level
        inside the rows read; C1 recomputed from the image has no stored part to check."""
        i, stored = plan.position, self.index["checksum"][plan.position]
        for key, (name, _) in plan.requests.items():
            value = data[key]
            if isinstance(value, BaseException):
                raise self._damaged(name, damage(value), i)
            if not self.checksums:
                continue
            if key == "memory":
                for l, start, size in zip(self.stored_levels, plan.starts, plan.sizes):
                    rows = start - plan.lo
                    if 0 <= rows and rows + size <= len(value):
                        if checksum(value[rows : rows + size]) != stored[self.part[f"memory[{l}]"]]:
                            raise self._damaged(f"memory (level {l})", _MISMATCH, i)
            elif checksum(value) != stored[self.part[name]]:
                raise self._damaged(name, _MISMATCH, i)

    def read(self, i: int, *, levels: tuple[int, ...] | None = None, c1: bool = True, targets: bool = True) -> Sample:
        """Image ``i`` (a position in the split) as a :class:`~mfcache.cache.sample.Sample`:
        ``levels`` the requested detector levels (None = all; each must be stored), ``c1`` if
        asked for and the split has it (maps are channels-last views of the stored rows, not
        contiguous), the targets with ``targets``. Float16 stays float16; int8 caches come
        back dequantised to float32."""
        return self.read_many([i], levels=levels, c1=c1, targets=targets)[0]

    def read_many(
        self, positions: list[int], *, levels: tuple[int, ...] | None = None, c1: bool = True, targets: bool = True
    ) -> list[Sample]:
        """:meth:`read` of several images, with all their chunk reads in flight at once."""
        self.check_levels(levels)
        wanted = [self.stored_levels.index(l) for l in (self.stored_levels if levels is None else levels)]
        plans = [self._plan(int(i), wanted, c1 and self.has_c1, targets) for i in positions]
        for plan in plans:  # metadata damage names the image it stops
            for name, _ in plan.requests.values():
                self.array(name, plan.position)
        data = self._fetch(
            {(j, key): request for j, plan in enumerate(plans) for key, request in plan.requests.items()}
        )
        images = [{key: data[(j, key)] for key in plan.requests} for j, plan in enumerate(plans)]
        for j, (plan, image) in enumerate(zip(plans, images)):
            try:
                self._check(plan, image)
            except MfcacheError:
                if self.cache.location.read_through is None:
                    raise
                # a local copy may be what is damaged: read the image from object storage once more
                images[j] = self._fetch(plan.requests, fresh=True)
                self._check(plan, images[j])
        return [self._assemble(plan, image) for plan, image in zip(plans, images)]

    def _plan(self, i: int, wanted: list[int], with_c1: bool, targets: bool) -> ReadPlan:
        """What to read for image ``i`` (:class:`ReadPlan`).
        Refuses an image that was not written, or whose index row (in RAM: the offsets about
        to be used) differs from what extraction wrote."""
        if self.index["done"][i] != DONE:
            raise MfcacheError(
                f"split {self.name!r} of {self.cache.path}: image id {int(self.index['image_id'][i])} "
                f"(position {i}) was {'skipped' if self.index['done'][i] == SKIPPED else 'not written'}"
            )
        for key in INDEX_ARRAYS:
            name = key.split("/", 1)[1]
            if key in self.part and checksum(self.index[name][i]) != self.index["checksum"][i, self.part[key]]:
                raise self._damaged(key, _MISMATCH, i)
        level_hw = self.index["level_hw"][i][self.stored_levels]  # [stored L, 2]
        sizes = level_hw.prod(-1)
        starts = self.index["token_offset"][i] + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        lo, hi = int(min(starts[l] for l in wanted)), int(max(starts[l] + sizes[l] for l in wanted))
        requests = {name: (name, i) for name in ("queries", "boxes", "scores", "labels", "query_index")}
        requests["memory"] = ("memory", slice(lo, hi))  # one read covering the wanted levels
        c1_hw = None
        if with_c1 and not self.recompute_c1:
            c1_hw = c1_size(self.index["input_hw"][i])
            c1_start = int(self.index["c1_offset"][i])
            requests["c1"] = ("c1", slice(c1_start, c1_start + c1_hw[0] * c1_hw[1]))
        if targets:
            requests.update(
                {"gt_id": ("targets/gt_id", i), "gt_iou": ("targets/gt_iou", i), "target_masks": ("targets/masks", i)}
            )
        requests.update({scale: (scale, i) for name, scale in self.scales.items() if name in requests})
        return ReadPlan(
            position=i,
            requests=requests,
            level_hw=level_hw,
            sizes=sizes,
            starts=starts,
            lo=lo,
            wanted=wanted,
            recompute_c1=with_c1 and self.recompute_c1,
        )

    def _assemble(self, plan: ReadPlan, data: dict[str, np.ndarray]) -> Sample:
        """The :class:`Sample` of image ``plan.position`` from its checked reads."""
        i = plan.position
        record = ImageRecord(
            **{
                name: data.get(name)
                for name in (
                    "queries",
                    "boxes",
                    "scores",
                    "labels",
                    "query_index",
                    "memory",
                    "c1",
                    "gt_id",
                    "gt_iou",
                    "target_masks",
                )
            },
            scales={scale: data[scale] for scale in self.scales.values() if scale in data},
        )
        sample = served_sample(
            record,
            image_id=self.index["image_id"][i],
            input_hw=self.index["input_hw"][i],
            orig_hw=self.index["orig_hw"][i],
            level_hw=plan.level_hw,
            wanted=plan.wanted,
            memory_start=plan.lo - int(self.index["token_offset"][i]),
            target_size=self.target_size,
        )
        if plan.recompute_c1:
            sample.c1 = self._c1_recomputer(self.image_path(i), tuple(self.index["input_hw"][i].tolist()))
        return sample


@dataclass(frozen=True)
class ReadPlan:
    """What :meth:`CacheSplit.read_many` reads for the image at ``position`` of a split, and
    where its stored levels lie in the rows read."""

    position: int
    requests: dict[str, tuple[str, int | slice]]  # part -> (array name, its selection), for _fetch
    level_hw: np.ndarray  # [stored L, 2] valid (h, w) of each stored level
    sizes: np.ndarray  # [stored L] tokens of each stored level
    starts: np.ndarray  # [stored L] first row of each stored level in ``memory``
    lo: int  # first ``memory`` row read (the wanted levels' span starts here)
    wanted: list[int]  # indices into the stored levels, in the order the head reads them
    recompute_c1: bool  # C1 is re-made from the image (not read)


_MISMATCH = "checksum mismatch (its stored bytes changed after extraction)"


async def _gather(reads):
    return await asyncio.gather(*reads, return_exceptions=True)


class CacheDataset(torch.utils.data.Dataset):
    """The complete images of a split as training/eval samples (see :meth:`CacheSplit.read`).

    Holds only the path, so it pickles cheaply into DataLoader workers, each of which
    opens the store itself.
    """

    def __init__(
        self,
        cache_path: str | Path | CacheLocation,
        split: str,
        *,
        levels: tuple[int, ...] | None,
        c1: bool,
        targets: bool,
        all_views: bool = False,
    ):
        self.cache_path, self.split_name = locate(cache_path), split
        self.kwargs = {"levels": levels, "c1": c1, "targets": targets}
        self.trusted = files_trusted()  # the workers that reopen the split inherit this choice
        self._split: CacheSplit | None = None
        self._open().check_levels(levels)  # a missing level is one clear error, before any worker starts
        if c1 and self._open().recompute_c1:  # so is running an untrusted stored program
            self._open()._c1_recomputer.require_trust()
        self.rows = self._open().view_rows(all_views=all_views)  # [M, views or 1]: item j is image j

    def _open(self) -> CacheSplit:
        if self._split is None:
            with trusting(self.trusted):
                self._split = Cache(self.cache_path).split(self.split_name)
        return self._split

    def __getstate__(self):
        return {**self.__dict__, "_split": None}

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, key: int | tuple[int, int]) -> int:  # image j (its view 0) or (j, view) with all_views
        return int(self.rows[key] if isinstance(key, tuple) else self.rows[key, 0])

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | ReadFailure:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[Sample] | list[ReadFailure]:
        """A whole batch (DataLoader fetches batches this way): every image's reads at once.
        In a DataLoader worker a refused read comes back as ``[ReadFailure]`` (:func:`collate`)."""
        try:
            return self._open().read_many([self.row(k) for k in keys], **self.kwargs)
        except MfcacheError as exc:
            if torch.utils.data.get_worker_info() is None:  # the main process: raise it as it is
                raise
            return [ReadFailure(str(exc))]


@dataclass(frozen=True)
class ReadFailure:
    """A read refused in a DataLoader worker (a damaged cache), returned as a value: torch
    re-raises a worker's exception as a new one whose message is the worker's traceback text,
    so the one-line error travels as data and :func:`raise_failures` raises it in the main
    process as the :class:`MfcacheError` it was."""

    message: str


def collate(samples: list[Sample] | list[ReadFailure]) -> Batch | ReadFailure:
    """The ``collate_fn`` of loaders over a :class:`CacheDataset`: :meth:`Batch.collate`, or
    the batch's :class:`ReadFailure` passed on."""
    if samples and isinstance(samples[0], ReadFailure):
        return samples[0]
    return Batch.collate(samples)


def raise_failures(batches: Iterable[Batch | ReadFailure]) -> Iterator[Batch]:
    """``batches``, with a worker's :class:`ReadFailure` raised as its one-line error."""
    for batch in batches:
        if isinstance(batch, ReadFailure):
            raise MfcacheError(batch.message)
        yield batch
