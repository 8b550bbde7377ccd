"""The cache layout: one table of arrays, the token plan, and the fingerprint.

A cache is one Zarr v3 group per detector x preprocessing, holding one subgroup per
dataset split (``train``, ``val``, ...)::

    CACHE/                      root attrs: {"mfcache": fingerprint}
      <split>/                  attrs: annotation hash, label -> category map, chunking
        index/*                 [N, ...] small per-image arrays, loaded whole into RAM
        queries, boxes, ...     [N, K, ...] regular arrays, chunked by write block
        memory                  [T, D] every image's encoder levels back to back (ragged)
        c1                      [P, C] every image's stride-4 backbone map (ragged)
        annotations             [bytes] the split's COCO JSON, so eval needs nothing else

Ragged arrays: image i owns rows ``[offset[i], offset[i] + count[i])``; every image starts
on a chunk boundary, so reading one image touches only its own chunks and two writers never
share a chunk. Counts follow from the resize rule, so offsets are planned before the
detector runs. ``index/done`` is written last for each block: ``0`` = not written yet,
``1`` = every array of the image is written, ``2`` = skipped (its input could not be read
and ``extract --skip-bad`` was given; the reason is in the split's attrs
``skipped: {image_id: reason}``). Skipped images are finished but absent: readers leave
them out. ``index/checksum [N, P]`` holds one CRC-32 per stored part of the image
(:func:`checksum_parts`: each array's row, ``memory`` one part per encoder level), written
with its block's data: the reader checks the parts it serves on every read (a head that
reads only some levels or no C1 pays only for what it reads), and ``mfcache verify`` checks
every part, so flipped bytes and lost chunk files, which zarr itself would read back
silently, are always refused.

Storage options (recorded in the fingerprint's extract options):

- ``dtype`` float16 | float32 | int8. With int8, ``queries``, ``memory`` and ``c1`` hold
  per-channel symmetric int8 values and :data:`SCALE_ARRAYS` their float32 scales per image
  and channel (``x ~= q * scale``, ``scale = max|x| / 127`` over the image's rows of that
  channel); the reader dequantises (:func:`dequantize`).
- ``levels``: the encoder levels stored in ``memory`` (detector level indices, finest = 0);
  ``index/level_hw`` keeps every level's shape, tokens are planned for stored levels only.
- ``compress``: blosc zstd + byte shuffle (typesize = the dtype's size, 1 MiB blocks) on
  ``queries``, ``memory`` and ``c1`` — worth it only on slow storage (~8-17% smaller).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from mfcache import __version__
from mfcache.config import ExtractConfig, choices
from mfcache.data.labels import AGNOSTIC, describe_change
from mfcache.data.prompts import describe_prompt_change
from mfcache.detectors.base import LEGACY_PREPROCESS, DetectorInfo, level_shapes

try:  # the same CRC-32 as zlib's, ~5x faster (ISA-L, SIMD): the `fast` extra
    from isal.isal_zlib import crc32 as _crc32

    CRC32_IMPLEMENTATION = "isal"
except ImportError:
    from zlib import crc32 as _crc32

    CRC32_IMPLEMENTATION = "zlib"

SCHEMA_VERSION = 3  # 2: index/checksum, done == 2 (skipped); 3: one checksum per array and level
C1_STRIDE = 4

# name: (dtype or None for the storage dtype, trailing shape keys, description)
# Trailing keys: K = top-k, D = d_model, C = C1 channels, L = levels, B = packed target bytes,
# P = checksum parts (checksum_parts(L)).
IMAGE_ARRAYS: dict[str, tuple[str | None, tuple[str, ...], str]] = {
    "index/image_id": ("int64", (), "COCO image id"),
    "index/orig_hw": ("int32", (2,), "original (h, w)"),
    "index/input_hw": ("int32", (2,), "detector input (h, w), unpadded"),
    "index/level_hw": ("int32", ("L", 2), "valid (h, w) per encoder level"),
    "index/token_offset": ("int64", (), "first row of the image in memory"),
    "index/c1_offset": ("int64", (), "first row of the image in c1"),
    "index/done": ("uint8", (), "0 pending, 1 written (set after the data), 2 skipped (bad input)"),
    "index/checksum": ("uint32", ("P",), "CRC-32 of each stored part of the image (checksum_parts)"),
    "queries": (None, ("K", "D"), "top-k decoder queries, score order"),
    "boxes": ("float32", ("K", 4), "xyxy, input pixels"),
    "scores": ("float32", ("K",), "detector score"),
    "labels": ("int32", ("K",), "detector label index (attrs label_to_category maps it)"),
    "query_index": ("int32", ("K",), "index among the detector's queries"),
    "targets/gt_id": ("int64", ("K",), "annotation id of the non-crowd GT with the highest box IoU, -1 if none"),
    "targets/gt_iou": ("float32", ("K",), "box IoU with that GT"),
    "targets/masks": ("uint8", ("K", "B"), "that GT's mask inside the box, bit-packed S x S"),
}
RAGGED_ARRAYS: dict[str, tuple[str, str]] = {
    "memory": ("D", "encoder output, the stored levels flattened row-major, finest first"),
    "c1": ("C", "backbone stride-4 map, row-major (h, w) pixels"),
}
# int8 caches: float32 per-image, per-channel scales of the quantised arrays.
SCALE_ARRAYS: dict[str, tuple[str, str]] = {
    "scales/queries": ("D", "queries scale per channel"),
    "scales/memory": ("D", "memory scale per channel (all stored levels)"),
    "scales/c1": ("C", "c1 scale per channel"),
}
QUANTIZED = {"queries": "scales/queries", "memory": "scales/memory", "c1": "scales/c1"}
STORAGE_DTYPES = {name: np.dtype(name).type for name in choices(ExtractConfig)["dtype"]}  # extract --dtype
INDEX_ARRAYS = tuple(name for name in IMAGE_ARRAYS if name.startswith("index/"))
DONE, SKIPPED = 1, 2
# Arrays the checksums cover, in order: everything but the flags themselves, then the ragged rows.
CHECKSUM_ARRAYS = (
    tuple(n for n in IMAGE_ARRAYS if n not in ("index/done", "index/checksum"))
    + tuple(RAGGED_ARRAYS)
    + tuple(SCALE_ARRAYS)
)


def c1_size(input_hw):
    """Detector input ``(h, w)`` -> the size of its stride-4 C1 map ``(ceil(h/4), ceil(w/4))``;
    elementwise on an ``[N, 2]`` array."""
    if isinstance(input_hw, np.ndarray) and input_hw.ndim == 2:
        return -(-input_hw // C1_STRIDE)
    return tuple(-(-int(x) // C1_STRIDE) for x in input_hw)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x [R, C]`` float -> (``q [R, C]`` int8, ``scale [C]`` float32): per-channel symmetric,
    ``scale = max|x| / 127`` (1 for an all-zero channel), ``q = round(x / scale)``."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(0) if len(x) else np.zeros(x.shape[1], np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(x / scale), -127, 127).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q [..., C]`` int8 and ``scale [C]`` -> float32 ``q * scale``."""
    return q.astype(np.float32) * scale


def checksum_parts(num_levels: int) -> tuple[str, ...]:
    """Names of ``index/checksum``'s columns for a detector with ``num_levels`` encoder levels:
    :data:`CHECKSUM_ARRAYS` in order, ``memory`` split into ``memory[l]`` per detector level
    (so a reader of some levels checks just those). Parts a cache does not store (levels
    outside ``extract.levels``, ``c1`` unless stored, scales unless int8) hold 0."""
    return tuple(
        part
        for name in CHECKSUM_ARRAYS
        for part in ([f"memory[{l}]" for l in range(num_levels)] if name == "memory" else [name])
    )


def checksum(values: np.ndarray) -> int:
    """CRC-32 (zlib's polynomial and value) of ``values``' bytes in storage dtype, C order (no
    copy for contiguous data): the one checksum of the cache, as extraction writes it and the
    reader and verify check it."""
    return _crc32(np.ascontiguousarray(values))


def memory_parts(memory: np.ndarray, level_hw: np.ndarray, levels: list[int]) -> dict[str, np.ndarray]:
    """One image's ``memory [T, D]`` rows (the stored ``levels``, finest first) split into its
    checksum parts ``{"memory[l]": [h_l * w_l, D]}``; ``level_hw [L, 2]`` every level's shape."""
    sizes = level_hw[levels].prod(-1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return {f"memory[{l}]": memory[starts[k] : starts[k + 1]] for k, l in enumerate(levels)}


def image_checksums(parts: dict[str, np.ndarray], num_levels: int) -> np.ndarray:
    """``[P]`` uint32: :func:`checksum` of each of one image's parts (:func:`checksum_parts`;
    ragged arrays: its valid rows, padding excluded); parts absent from ``parts`` hold 0."""
    return np.array(
        [checksum(parts[name]) if name in parts else 0 for name in checksum_parts(num_levels)], dtype=np.uint32
    )


@dataclass(frozen=True)
class ExtractSettings:
    """How a cache was extracted: the typed view of a fingerprint's ``extract`` options (and
    of the pixel path, which the fingerprint keeps in the detector's preprocessing). Options
    added after schema 3 (``amp``, ``views``, ``label_map``; ``view_crop`` is written only when
    not 0) read, in caches written before them, as what those caches were made with, as does
    the pixel path (:func:`stored_resize`); ``levels`` and ``compress`` are in every schema-3
    fingerprint."""

    topk: int  # detections stored per image
    target_size: int  # side of the stored GT mask crops
    c1: str  # store | recompute | none
    dtype: str  # storage dtype of queries, memory and c1 (STORAGE_DTYPES)
    levels: tuple[int, ...]  # detector level indices held in memory, finest first
    compress: bool = False
    resize: str = LEGACY_PREPROCESS["resize"]  # the detector's Preprocess.resize
    amp: str = "off"  # mixed precision of the detector's forward pass
    # detector labels -> dataset categories (mfcache.data.labels): None by name, "agnostic", or the map
    label_map: dict | str | None = field(default=None, hash=False)
    views: int = 1  # rows per image (mfcache.data.views): image-major, view 0 the plain image
    view_crop: float = 0.0  # probability a view >= 1 is cropped (mfcache.data.views.view_crop)

    @property
    def agnostic(self) -> bool:
        """Class-agnostic: every detection a candidate, a sigmoid detector's query cached once."""
        return self.label_map == AGNOSTIC

    @classmethod
    def from_fingerprint(cls, fp: dict) -> ExtractSettings:
        extract = fp["extract"]
        return cls(
            topk=extract["topk"],
            target_size=extract["target_size"],
            c1=extract["c1"],
            dtype=extract["dtype"],
            levels=tuple(stored_levels(fp)),
            compress=extract["compress"],
            resize=stored_resize(fp),
            amp=extract.get("amp", "off"),
            label_map=extract.get("label_map"),
            views=extract.get("views", 1),
            view_crop=extract.get("view_crop", 0.0),
        )

    def options(self) -> dict:
        """The fingerprint's ``extract`` dict, as written to disk (the keyword arguments of
        :func:`fingerprint`; ``resize`` is the detector's, not among them). ``view_crop`` only when
        it is not 0: a cache without crops has the fingerprint it had before the option."""
        crop = {"view_crop": self.view_crop} if self.view_crop else {}
        return {
            "topk": self.topk,
            "target_size": self.target_size,
            "c1": self.c1,
            "dtype": self.dtype,
            "levels": list(self.levels),
            "compress": self.compress,
            "amp": self.amp,
            "label_map": self.label_map,
            "views": self.views,
            **crop,
        }


def fingerprint(
    info: DetectorInfo,
    *,
    topk: int,
    target_size: int,
    c1: str,
    dtype: str,
    levels: tuple[int, ...] | None = None,
    compress: bool = False,
    amp: str = "off",
    label_map: dict | str | None = None,
    views: int = 1,
    view_crop: float = 0.0,
) -> dict:
    """What a cache's contents depend on, besides the images and annotations.
    ``levels``: stored encoder level indices (None = all); ``label_map``: how detector labels
    become dataset categories (:mod:`mfcache.data.labels`: None by name, a map, ``"agnostic"``);
    ``views``: rows per image, ``view_crop``: the probability a view >= 1 is cropped
    (:mod:`mfcache.data.views`)."""
    settings = ExtractSettings(
        topk=topk,
        target_size=target_size,
        c1=c1,
        dtype=dtype,
        compress=compress,
        amp=amp,
        levels=tuple(range(len(info.strides)) if levels is None else levels),
        resize=info.preprocess.resize,
        label_map=label_map,
        views=views,
        view_crop=view_crop,
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "detector": info.to_dict(),
        "extract": settings.options(),
        "mfcache_version": __version__,
    }


def stored_levels(fp: dict) -> list[int]:
    """Encoder level indices held in ``memory`` (every schema-3 fingerprint records them)."""
    return list(fp["extract"]["levels"])


def stored_resize(fp: dict) -> str:
    """The pixel path (``Preprocess.resize``) a cache was made with (caches from before the
    option: ``float``)."""
    return fp["detector"]["preprocess"].get("resize", LEGACY_PREPROCESS["resize"])


def fingerprint_mismatch(stored: dict, wanted: dict) -> str | None:
    """A one-line description of the first difference that makes a cache unusable, or None.

    The mfcache version is informative only; everything else must match exactly.
    """
    stored, wanted = json.loads(json.dumps(stored)), json.loads(json.dumps(wanted))  # tuples == lists
    if stored.get("schema_version") != wanted["schema_version"]:
        return f"schema version {stored.get('schema_version')} (this mfcache writes {wanted['schema_version']})"
    sd, wd = stored["detector"], wanted["detector"]
    # a cache written before a preprocessing field existed was made as the legacy value says
    sd = {**sd, "preprocess": {**LEGACY_PREPROCESS, **sd.get("preprocess", {})}}
    resize = sd["preprocess"]["resize"], wd["preprocess"]["resize"]
    prompts = sd.get("prompts", []), wd.get("prompts", [])  # none in caches from before prompts existed
    for key in ("family", "weights_sha256", "preprocess", "strides", "label_names", "num_queries", "d_model"):
        if key == "label_names" and prompts[0] != prompts[1]:  # an open-vocabulary detector's labels: its prompt
            return f"{describe_prompt_change(*prompts)}: another prompt is another cache"
        if key == "preprocess" and resize[0] != resize[1]:  # the same detector on the other pixel path
            return f"preprocessing resize={resize[0]!r} (asked for {resize[1]!r})"
        if sd.get(key) != wd.get(key):
            what = "weights" if key == "weights_sha256" else key
            return f"another detector ({what} differ: cache has {sd.get('spec')!r})"
    # options added later read as their defaults in caches written before them
    defaults = {"amp": "off", "views": 1, "view_crop": 0.0}
    have, value = stored["extract"].get("label_map"), wanted["extract"].get("label_map")
    if have != value:  # first: it also changes the top-k of a class-agnostic cache
        return f"{describe_change(have, value)}: another label mapping is another cache"
    wanted_extract = {**{k: defaults[k] for k in stored["extract"] if k == "view_crop"}, **wanted["extract"]}
    for key, value in wanted_extract.items():  # view_crop is written only when not 0
        have = stored["extract"].get(key, defaults.get(key))
        if have != value:
            return f"extract option {key}={have!r} (asked for {value!r})"
    return None


@dataclass
class SplitPlan:
    """Where every image of a split goes, decided before the detector runs.

    image_id [N]; orig_hw, input_hw [N, 2]; level_hw [N, L, 2];
    token_offset / c1_offset [N + 1] (the last entry is the array length).
    """

    image_id: np.ndarray
    orig_hw: np.ndarray
    input_hw: np.ndarray
    level_hw: np.ndarray
    token_offset: np.ndarray
    c1_offset: np.ndarray
    chunk_tokens: int
    c1_chunk: int

    @property
    def num_rows(self) -> int:
        return len(self.image_id)


def _aligned_offsets(counts: np.ndarray, chunk: int) -> np.ndarray:
    padded = -(-counts // chunk) * chunk
    return np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)


def auto_chunk_tokens(tokens_per_image: np.ndarray) -> int:
    """A power of two near a quarter of the median image: padding wastes < ~25%,
    and chunks stay in the MB range at COCO scale (4096 tokens x 256 x fp16 = 2 MiB)."""
    median = float(np.median(tokens_per_image)) if len(tokens_per_image) else 1024.0
    return int(min(4096, max(64, 2 ** round(np.log2(max(median / 4, 1))))))


def plan_split(
    image_ids,
    orig_hw,
    info: DetectorInfo,
    chunk_tokens: int = 0,
    levels: list[int] | tuple[int, ...] | None = None,
    input_hw: np.ndarray | None = None,
) -> SplitPlan:
    """Token and C1 offsets of every image: ``image_ids [N]``, ``orig_hw [N, 2]``; tokens
    count the stored ``levels`` only (None = all), ``level_hw`` holds every level.
    ``input_hw [N, 2]``: the detector input sizes when they are not the detector's resize
    rule's (rescaled views, :func:`mfcache.data.views.rows_input_hw`)."""
    orig_hw = np.asarray(orig_hw, dtype=np.int32).reshape(-1, 2)
    if input_hw is None:
        input_hw = np.array([info.preprocess.input_size(int(h), int(w)) for h, w in orig_hw], dtype=np.int32)
    input_hw = np.asarray(input_hw, dtype=np.int32).reshape(-1, 2)
    level_hw = np.array([level_shapes(tuple(hw), info.strides) for hw in input_hw], dtype=np.int32)
    level_hw = level_hw.reshape(-1, len(info.strides), 2)
    stored = list(range(len(info.strides))) if levels is None else list(levels)
    tokens = level_hw[:, stored].prod(-1).sum(-1).astype(np.int64)
    c1_pixels = c1_size(input_hw).prod(-1).astype(np.int64)
    chunk_tokens = chunk_tokens or auto_chunk_tokens(tokens)
    c1_chunk = chunk_tokens * 2  # a stride-4 map has ~3x the pixels of all encoder levels
    return SplitPlan(
        image_id=np.asarray(image_ids, dtype=np.int64),
        orig_hw=orig_hw,
        input_hw=input_hw,
        level_hw=level_hw,
        token_offset=_aligned_offsets(tokens, chunk_tokens),
        c1_offset=_aligned_offsets(c1_pixels, c1_chunk),
        chunk_tokens=chunk_tokens,
        c1_chunk=c1_chunk,
    )


def packed_bytes(target_size: int) -> int:
    return (target_size * target_size + 7) // 8


@dataclass
class StoragePlan:
    """Bytes a split's images take on disk, uncompressed, per array (``{name: [N] int64}``:
    memory and c1 rows include the padding to their chunk boundary, as written)."""

    parts: dict[str, np.ndarray]

    def per_image(self) -> np.ndarray:
        """``[N]`` bytes of each image."""
        return sum(self.parts.values())

    def total(self, positions: np.ndarray | None = None) -> int:
        """Bytes of the images at ``positions`` (None = all)."""
        per = self.per_image()
        return int(per.sum() if positions is None else per[positions].sum())

    def line(self, positions: np.ndarray, unit: str = "image") -> str:
        """``12 images, 1.3 MiB per image (memory 0.9, c1 0.4, ...), 16 MiB in all`` (``unit``
        "row" for a cache of several views per image)."""
        n = len(positions)
        if n == 0:
            return "nothing left to write"
        parts = sorted(((int(v[positions].sum()) / n, k) for k, v in self.parts.items()), reverse=True)
        shown = ", ".join(f"{k} {format_bytes(b)}" for b, k in parts if b >= 0.01 * self.total(positions) / n)
        return (
            f"{n} {unit}s, {format_bytes(self.total(positions) / n)} per {unit} ({shown}), "
            f"{format_bytes(self.total(positions))} in all"
        )


def storage_plan(
    plan: SplitPlan, *, topk: int, d_model: int, c1_channels: int, dtype: str, target_size: int
) -> StoragePlan:
    """What each image of ``plan`` will take on disk (``c1_channels`` 0: C1 not stored)."""
    size = np.dtype(STORAGE_DTYPES[dtype]).itemsize
    n = plan.num_rows
    per_query = 4 * 4 + 4 + 4 + 4 + 8 + 4 + packed_bytes(target_size)  # boxes .. targets/masks
    parts = {
        "memory": np.diff(plan.token_offset) * d_model * size,
        "c1": np.diff(plan.c1_offset) * c1_channels * size,
        "queries": np.full(n, topk * d_model * size),
        "boxes, scores, labels, targets": np.full(n, topk * per_query),
    }
    if dtype == "int8":
        parts["scales"] = np.full(n, (2 * d_model + c1_channels) * 4)
    return StoragePlan({k: np.asarray(v, dtype=np.int64) for k, v in parts.items()})


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
