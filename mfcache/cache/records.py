"""Detector outputs -> stored record -> :class:`~mfcache.cache.sample.Sample`: the one path an
image takes into the cache and back out, used by extraction (writing), the reader (serving)
and ``predict`` (which serves the detector's outputs at the cache's precision, so the head
sees exactly what training data looked like).

* :func:`image_sample`: image ``b`` of a detector batch as a full-precision :class:`Sample`
  on the detector's device, every level cropped to the image's valid region.
* :func:`image_record`: that sample as the cache stores it (:class:`ImageRecord`: numpy,
  the storage dtype, int8 quantised per image and channel, targets matched and packed).
* :func:`served_sample`: a record (as written, or as read back) as the reader serves it.
* :func:`as_served`: a sample as the reader would serve it once stored, without a record
  (the same rounding: :func:`stored_features`, then what :func:`served_sample` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from mfcache.cache.sample import Sample
from mfcache.cache.schema import QUANTIZED, STORAGE_DTYPES, c1_size, dequantize, quantize
from mfcache.cache.targets import query_targets
from mfcache.errors import MfcacheError
from mfcache.ops.masks import pack_masks, unpack_masks

if TYPE_CHECKING:  # the reader imports this module: no detector code at run time
    from mfcache.data.coco import GroundTruth
    from mfcache.detectors.base import DetectorOutput, TopK


@dataclass
class ImageRecord:
    """One image's outputs as stored (numpy, storage dtypes).

    queries [K, D]; boxes [K, 4] xyxy input px; scores, labels, query_index [K];
    gt_id, gt_iou [K] and target_masks [K, B] packed bits (None without targets);
    memory [T, D] the valid tokens of the stored levels (finest first, each row-major);
    c1 [P, C] row-major pixels, or None; scales: int8 caches only,
    ``{"scales/queries": [D], "scales/memory": [D], "scales/c1": [C]}``.
    """

    queries: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    query_index: np.ndarray
    memory: np.ndarray
    c1: np.ndarray | None = None
    gt_id: np.ndarray | None = None
    gt_iou: np.ndarray | None = None
    target_masks: np.ndarray | None = None
    scales: dict[str, np.ndarray] | None = None


def image_sample(
    out: DetectorOutput,
    top: TopK,
    b: int,
    *,
    level_hw: np.ndarray,
    input_hw: Sequence[int],
    image_id: int,
    orig_hw: Sequence[int],
) -> Sample:
    """Image ``b`` of a detector batch, cropped to its valid region (on the detector's device
    and dtype): the top-k detections ``top`` and every encoder level, finest first.
    ``level_hw [L, 2]``: the planned valid size of each level (checked against the detector's)."""
    valid = out.valid[b].cpu().numpy()
    if not np.array_equal(valid, level_hw):
        raise MfcacheError(f"detector feature sizes {valid.tolist()} differ from the planned {level_hw.tolist()}")
    levels, start = [], 0
    for (height, width), (h, w) in zip(out.spatial_shapes.tolist(), level_hw.tolist()):
        level = out.memory[b, start : start + height * width].view(height, width, -1)
        levels.append(level[:h, :w].permute(2, 0, 1))
        start += height * width
    c1 = None
    if out.c1 is not None:
        h, w = c1_size(input_hw)
        c1 = out.c1[b, :, :h, :w]
    return Sample(
        image_id=int(image_id),
        queries=top.queries[b],
        boxes=top.boxes[b].float(),
        scores=top.scores[b].float(),
        labels=top.labels[b].long(),
        query_index=top.query_index[b].long(),
        levels=levels,
        input_hw=torch.as_tensor(tuple(input_hw), dtype=torch.int64),
        orig_hw=torch.as_tensor(tuple(orig_hw), dtype=torch.int64),
        c1=c1,
    )


def stored_features(
    sample: Sample, dtype: str, levels: Sequence[int] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The feature rows of a cropped sample exactly as the cache stores them:
    ``queries [K, D]``, ``memory [T, D]`` (the tokens of the stored ``levels``, None = all,
    finest first, each level row-major), ``c1 [h*w, C]`` (if the sample has one), in numpy
    ``dtype``. For int8 also the per-channel scales, keyed by their array names
    (:data:`~mfcache.cache.schema.QUANTIZED`); otherwise None."""
    wanted = range(len(sample.levels)) if levels is None else levels
    features = {
        "queries": sample.queries,
        "memory": torch.cat([sample.levels[l].flatten(1).T for l in wanted]),
        **({"c1": sample.c1.flatten(1).T} if sample.c1 is not None else {}),  # [h*w, C] row-major pixels
    }
    features = {k: v.float().cpu().numpy() for k, v in features.items()}
    if dtype != "int8":
        return {k: v.astype(STORAGE_DTYPES[dtype]) for k, v in features.items()}, None
    quantized = {k: quantize(v) for k, v in features.items()}
    return ({k: q for k, (q, _) in quantized.items()}, {QUANTIZED[k]: scale for k, (_, scale) in quantized.items()})


def image_record(
    sample: Sample, *, gt: GroundTruth | None, target_size: int, dtype: str, levels: Sequence[int] | None = None
) -> ImageRecord:
    """The cache record of a cropped sample (:func:`image_sample`); with ``gt`` (the image's
    annotations) also its per-query targets. ``memory`` holds the stored ``levels`` (None =
    all); int8 is quantised per channel."""
    features, scales = stored_features(sample, dtype, levels)
    boxes = sample.boxes.cpu()
    targets = {}
    if gt is not None:
        gt_id, gt_iou, masks = query_targets(boxes, tuple(sample.input_hw.tolist()), gt, target_size)
        targets = {
            "gt_id": gt_id.numpy().astype(np.int64),
            "gt_iou": gt_iou.numpy().astype(np.float32),
            "target_masks": pack_masks(masks),
        }
    return ImageRecord(
        queries=features["queries"],
        boxes=boxes.numpy().astype(np.float32),
        scores=sample.scores.cpu().numpy(),
        labels=sample.labels.cpu().numpy().astype(np.int32),
        query_index=sample.query_index.cpu().numpy().astype(np.int32),
        memory=features["memory"],
        c1=features.get("c1"),
        scales=scales,
        **targets,
    )


def served_sample(
    record: ImageRecord,
    *,
    image_id: int,
    input_hw: Sequence[int],
    orig_hw: Sequence[int],
    level_hw: np.ndarray,
    wanted: Sequence[int],
    memory_start: int = 0,
    target_size: int | None = None,
) -> Sample:
    """A record as the reader serves it: int8 dequantised to float32, float16 kept.

    ``level_hw [L, 2]``: the sizes of the stored levels, in ``record.memory``'s order;
    ``wanted``: positions among them of the levels to serve; ``memory_start``: the token row
    (from the image's first) where ``record.memory`` begins, when only part was read. The
    maps are ``[D, h, w]`` views of the row-major stored rows (:meth:`Batch.collate` copies
    them once). Targets are served when the record has them (``target_size``: their side)."""
    scales = record.scales or {}

    def features(name: str) -> np.ndarray:
        rows = getattr(record, name)
        return dequantize(rows, scales[QUANTIZED[name]]) if QUANTIZED[name] in scales else rows

    levels = _level_maps(features("memory"), level_hw, wanted, memory_start)
    c1 = None
    if record.c1 is not None:
        c1 = torch.from_numpy(features("c1").reshape(*c1_size(input_hw), -1)).permute(2, 0, 1)
    targets = {}
    if record.gt_id is not None:
        targets = {
            "gt_id": torch.from_numpy(record.gt_id),
            "gt_iou": torch.from_numpy(record.gt_iou),
            "target_masks": unpack_masks(record.target_masks, target_size),
        }
    return Sample(
        image_id=int(image_id),
        queries=torch.from_numpy(features("queries")),
        boxes=torch.from_numpy(record.boxes),
        scores=torch.from_numpy(record.scores),
        labels=torch.from_numpy(record.labels.astype(np.int64)),
        query_index=torch.from_numpy(record.query_index.astype(np.int64)),
        levels=levels,
        input_hw=torch.as_tensor(tuple(int(x) for x in input_hw), dtype=torch.int64),
        orig_hw=torch.as_tensor(tuple(int(x) for x in orig_hw), dtype=torch.int64),
        c1=c1,
        **targets,
    )


def as_served(sample: Sample, *, dtype: str, levels: Sequence[int], wanted: Sequence[int], store_c1: bool) -> Sample:
    """``sample`` (:func:`image_sample`) as the reader serves it from a cache made with
    ``dtype`` and the encoder ``levels`` (stored, finest first), on the CPU and without a
    record: queries, the ``wanted`` levels (positions among ``levels``) and, with
    ``store_c1``, C1 rounded to ``dtype`` (float16 kept, int8 quantised per channel over all
    stored tokens and dequantised to float32); without ``store_c1`` C1 stays float32, as the
    reader's recomputing stem serves it. Boxes, scores, labels and sizes are served as computed."""
    sample = sample.cpu()
    c1 = sample.c1
    rounded = replace(sample, c1=c1 if store_c1 else None)
    features, scales = stored_features(rounded, dtype, levels)
    if scales is not None:
        features = {k: dequantize(v, scales[QUANTIZED[k]]) for k, v in features.items()}
    level_hw = np.asarray([sample.levels[l].shape[1:] for l in levels])
    if store_c1 and c1 is not None:
        c1 = torch.from_numpy(features["c1"].reshape(*c1.shape[1:], -1)).permute(2, 0, 1)
    elif c1 is not None:
        c1 = c1.float()
    return replace(
        sample,
        queries=torch.from_numpy(features["queries"]),
        levels=_level_maps(features["memory"], level_hw, wanted),
        c1=c1,
    )


def _level_maps(memory: np.ndarray, level_hw: np.ndarray, wanted: Sequence[int], start: int = 0) -> list[torch.Tensor]:
    """The ``[D, h, w]`` maps of the ``wanted`` levels (positions in ``level_hw [L, 2]``) of
    ``memory [T, D]``: each level's tokens row-major, finest first, ``memory`` beginning at
    token row ``start`` of the image's (views, not copies)."""
    sizes = np.asarray(level_hw).prod(-1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) - start
    return [
        torch.from_numpy(memory[starts[l] : starts[l] + sizes[l]].reshape(*level_hw[l], -1)).permute(2, 0, 1)
        for l in wanted
    ]
