"""The one type every stage hands a mask head: an image's :class:`Sample` and a :class:`Batch`.

Produced in one place (:mod:`mfcache.cache.records`: detector outputs -> stored record ->
sample) and batched in one place (:meth:`Batch.collate`), whether the image came from the
cache (training, evaluation) or straight from the detector (``predict``).

Conventions: ``K`` cached detections per image (score order), ``D`` the detector's width,
``C`` the C1 channels; boxes are xyxy in detector-input pixels; maps are ``[channels, h, w]``
cropped to the image's valid (unpadded) region.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor


@dataclass
class Sample:
    """One image's cached detector outputs (and, for training, its per-query targets).

    queries ``[K, D]`` (the stored dtype: float16, or float32); boxes ``[K, 4]`` float32;
    scores ``[K]`` float32; labels, query_index ``[K]`` int64 (a detection's detector label
    and the query it came from); levels: one ``[D, h_l, w_l]`` map per encoder level the head
    reads, finest first; input_hw, orig_hw ``[2]`` int64 (detector input and original image
    size); c1 ``[C, ceil(h/4), ceil(w/4)]`` or None; targets (None when not read):
    gt_id ``[K]`` int64 (COCO annotation id of the matched GT, -1 none), gt_iou ``[K]``
    float32 (box IoU with it), target_masks ``[K, S, S]`` bool (its mask inside the box)."""

    image_id: int
    queries: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    query_index: Tensor
    levels: list[Tensor]
    input_hw: Tensor
    orig_hw: Tensor
    c1: Tensor | None = None
    gt_id: Tensor | None = None
    gt_iou: Tensor | None = None
    target_masks: Tensor | None = None

    def cpu(self) -> Sample:
        """The same sample with every tensor on the CPU."""
        return _map(self, lambda t: t.cpu())


@dataclass
class Batch:
    """Samples stacked for a head: per-query tensors ``[B, K, ...]`` (queries float32),
    levels ``[B, D, H_l, W_l]`` and c1 ``[B, C, H, W]`` zero-padded bottom/right in the
    stored dtype, with each image's valid sizes ``level_hw [B, L, 2]`` and ``c1_hw [B, 2]``
    (a head computes an image's masks from its valid region alone, so an image's results
    never depend on its batch mates); image_id a list of ``B`` ints."""

    image_id: list[int]
    queries: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    query_index: Tensor
    levels: list[Tensor]
    level_hw: Tensor
    input_hw: Tensor
    orig_hw: Tensor
    c1: Tensor | None = None
    c1_hw: Tensor | None = None
    gt_id: Tensor | None = None
    gt_iou: Tensor | None = None
    target_masks: Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_id)

    @classmethod
    def collate(cls, samples: list[Sample]) -> Batch:
        """Stack ``samples`` (a DataLoader ``collate_fn``): every field of :class:`Sample`
        is stacked or padded; an optional field is present for all samples or for none."""
        first = samples[0]
        per_level = [[s.levels[l] for s in samples] for l in range(len(first.levels))]
        optional = {}
        for name in ("gt_id", "gt_iou", "target_masks"):
            if getattr(first, name) is not None:
                optional[name] = torch.stack([getattr(s, name) for s in samples])
        if first.c1 is not None:
            maps = [s.c1 for s in samples]
            optional.update(c1=pad_maps(maps), c1_hw=valid_hw(maps))
        return cls(
            image_id=[s.image_id for s in samples],
            queries=torch.stack([s.queries for s in samples]).float(),
            **{
                name: torch.stack([getattr(s, name) for s in samples])
                for name in ("boxes", "scores", "labels", "query_index", "input_hw", "orig_hw")
            },
            levels=[pad_maps(maps) for maps in per_level],
            level_hw=(
                torch.stack([valid_hw(maps) for maps in per_level], 1)
                if per_level
                else torch.zeros(len(samples), 0, 2, dtype=torch.int64)
            ),
            **optional,
        )

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The batch on ``device``; float16 maps (an fp16 cache's) become float32 there, so
        they cross to the device at half the bytes."""

        def move(t: Tensor) -> Tensor:
            t = t.to(device, non_blocking=non_blocking)
            return t.float() if t.dtype == torch.float16 else t

        return _map(self, move)

    def record_stream(self, stream) -> None:
        """Mark every tensor as used by CUDA ``stream`` (see :func:`on_device`)."""
        _map(self, lambda t: (t.record_stream(stream), t)[1])

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``), so
        :meth:`to` can copy to a GPU without blocking."""
        return _map(self, lambda t: t.pin_memory())


def on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches`` moved to ``device``. On a GPU the next batch is copied on a side stream
    while the current one computes (the DataLoader pins host batches, so the copy does not
    block); elsewhere each batch is moved when it is needed."""
    if device.type != "cuda":
        yield from (batch.to(device) for batch in batches)
        return
    stream = torch.cuda.Stream(device)
    source = iter(batches)

    def copy_next() -> Batch | None:
        batch = next(source, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return batch.to(device)

    upcoming = copy_next()
    while upcoming is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        upcoming.record_stream(torch.cuda.current_stream(device))  # its memory stays until this step is done
        current, upcoming = upcoming, copy_next()
        yield current


def _map(item, fn):
    """``item`` (a Sample or Batch) with ``fn`` applied to each tensor, lists of tensors included."""
    changes = {}
    for f in fields(item):
        value = getattr(item, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = fn(value)
        elif isinstance(value, list) and value and isinstance(value[0], Tensor):
            changes[f.name] = [fn(t) for t in value]
    return replace(item, **changes)


def pad_maps(maps: list[Tensor]) -> Tensor:
    """``[C, h_i, w_i]`` maps -> ``[B, C, max h, max w]`` in their own dtype (fp16 from an fp16
    cache: half the bytes to move; :meth:`Batch.to` makes it float32 on the device),
    channels-last memory format, zero-padded bottom/right (the same padding the detector's
    batch had; heads never read it: :meth:`Batch.collate` records each map's valid size).
    Inside a DataLoader worker the batch is allocated in shared memory directly, as torch's
    ``default_collate`` does, so handing it to the main process copies nothing."""
    height = max(m.shape[1] for m in maps)
    width = max(m.shape[2] for m in maps)
    shape = (len(maps), height, width, maps[0].shape[0])
    if torch.utils.data.get_worker_info() is not None:
        out = (
            maps[0]
            .new_empty(0)
            .new(maps[0].untyped_storage()._new_shared(int(np.prod(shape)) * maps[0].element_size()))
            .view(shape)
        )
    else:
        out = maps[0].new_empty(shape)
    out = out.permute(0, 3, 1, 2)  # channels-last, like the stored rows: contiguous copies below
    for i, m in enumerate(maps):  # each byte written once: the map, then only its padding zeroed
        h, w = m.shape[1:]
        out[i, :, :h, :w] = m
        out[i, :, h:, :] = 0
        out[i, :, :h, w:] = 0
    return out


def valid_hw(maps: list[Tensor]) -> Tensor:
    """``[C, h_i, w_i]`` maps -> their valid sizes ``[B, 2]`` long (what padding hides)."""
    return torch.tensor([m.shape[1:] for m in maps], dtype=torch.int64).reshape(-1, 2)
