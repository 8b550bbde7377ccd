"""Stage 1: run the frozen detector once over a COCO split and cache what the heads need.

Resumable by construction: images are written in blocks whose ``done`` flags are set
last, so running the same command again skips every finished block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mfcache.cache.schema import fingerprint, plan_split
from mfcache.cache.targets import query_targets
from mfcache.cache.writer import BlockWriter, ImageRecord, create_split, open_root
from mfcache.config import ExtractConfig
from mfcache.data.coco import CocoDataset
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.detectors import load_detector
from mfcache.detectors.base import DetectorOutput, Preprocess, TopK, select_topk
from mfcache.errors import MfcacheError
from mfcache.masks import pack_masks
from mfcache.runtime import progress_bar, resolve_device

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class ExtractSummary:
    split: str
    num_images: int
    written: int
    cache: Path


def split_name(annotation_file: Path) -> str:
    """``instances_val2017.json`` -> ``val2017``; ``train.json`` -> ``train``."""
    name = annotation_file.stem.removeprefix("instances_")
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "split"


def label_to_category(label_names: tuple[str, ...], category_names: dict[int, str]) -> list[int]:
    """Detector label index -> dataset category id, by name; -1 for labels the dataset lacks."""
    by_name = {name: cid for cid, name in category_names.items()}
    mapping = [by_name.get(name, -1) for name in label_names]
    if all(m == -1 for m in mapping):
        raise MfcacheError(
            f"none of the detector's labels ({', '.join(label_names[:6])}, ...) names a category of the "
            f"dataset ({', '.join(list(category_names.values())[:6])}, ...)"
        )
    return mapping


class _ImageSource(Dataset):
    """Decodes image ``positions[j]`` and its ground truth (runs in DataLoader workers).
    Problems come back as a message, so the main process can report them in one line."""

    def __init__(self, dataset: CocoDataset, positions: np.ndarray, preprocess: Preprocess):
        self.dataset, self.positions, self.preprocess = dataset, positions, preprocess

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> dict:
        i = int(self.positions[j])
        image = self.dataset.images[i]
        try:
            pixels = load_image(self.dataset.image_path(image))
            if tuple(pixels.shape[1:]) != (image.height, image.width):
                raise MfcacheError(
                    f"image {self.dataset.image_path(image)} is {pixels.shape[1]}x{pixels.shape[2]} (h x w) "
                    f"but the annotations say {image.height}x{image.width}"
                )
            return {"position": i, "input": to_input(pixels, self.preprocess),
                    "gt": self.dataset.ground_truth(image)}
        except MfcacheError as exc:
            return {"position": i, "error": str(exc)}


def image_record(out: DetectorOutput, top: TopK, b: int, *, level_hw: np.ndarray, input_hw, gt,
                 target_size: int, dtype) -> ImageRecord:
    """Image ``b`` of a detector batch, cropped to its valid region, with its targets."""
    valid = out.valid[b].cpu().numpy()
    if not np.array_equal(valid, level_hw):
        raise MfcacheError(f"detector feature sizes {valid.tolist()} differ from the planned {level_hw.tolist()}")
    levels, start = [], 0
    for (height, width), (h, w) in zip(out.spatial_shapes.tolist(), level_hw.tolist()):
        level = out.memory[b, start: start + height * width].view(height, width, -1)
        levels.append(level[:h, :w].reshape(h * w, -1))
        start += height * width
    c1 = None
    if out.c1 is not None:
        h, w = -(-input_hw[0] // 4), -(-input_hw[1] // 4)
        c1 = out.c1[b, :, :h, :w].permute(1, 2, 0).reshape(h * w, -1).cpu().numpy().astype(dtype)
    boxes = top.boxes[b].float().cpu()
    gt_id, gt_iou, masks = query_targets(boxes, input_hw, gt, target_size)
    return ImageRecord(
        queries=top.queries[b].cpu().numpy().astype(dtype),
        boxes=boxes.numpy().astype(np.float32),
        scores=top.scores[b].float().cpu().numpy(),
        labels=top.labels[b].cpu().numpy().astype(np.int32),
        query_index=top.query_index[b].cpu().numpy().astype(np.int32),
        gt_id=gt_id.numpy().astype(np.int64),
        gt_iou=gt_iou.numpy().astype(np.float32),
        target_masks=pack_masks(masks),
        memory=torch.cat(levels).cpu().numpy().astype(dtype),
        c1=c1,
    )


def extract(*, detector: str, images: Path, annotations: Path, out: Path, split: str | None = None,
            config: ExtractConfig = ExtractConfig(), progress: bool = True) -> ExtractSummary:
    """Cache detector ``detector`` (a spec) on one COCO split; returns what was done."""
    if config.c1 not in ("store", "none"):
        raise MfcacheError(f"--c1 must be store or none, got {config.c1!r}")
    if config.dtype not in STORAGE_DTYPES:
        raise MfcacheError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {config.dtype!r}")
    dataset = CocoDataset(annotations, images)
    if not len(dataset):
        raise MfcacheError(f"{annotations} lists no images")
    split = split or split_name(Path(annotations))
    device = resolve_device(config.device)
    model = load_detector(detector, device=device)
    info = model.info
    num_classes = len(info.label_names)
    topk = min(config.topk, info.num_queries * (num_classes if info.sigmoid else 1))

    root = open_root(Path(out), fingerprint(info, topk=topk, target_size=config.target_size,
                                           c1=config.c1, dtype=config.dtype))
    plan = plan_split([im.id for im in dataset.images], [(im.height, im.width) for im in dataset.images],
                      info, config.chunk_tokens)
    meta = {
        "annotations_sha256": dataset.sha256, "annotation_file": str(annotations), "images_dir": str(images),
        "label_to_category": label_to_category(info.label_names, dataset.category_names),
        "category_names": {str(k): v for k, v in dataset.category_names.items()},
    }
    group = create_split(
        root, split, plan, meta=meta, annotations=Path(annotations).read_bytes(), topk=topk,
        d_model=info.d_model, c1_channels=info.c1_channels if config.c1 == "store" else 0,
        target_size=config.target_size, block_size=config.block_size, dtype=config.dtype,
    )
    writer = BlockWriter(group)
    block = int(group.attrs["block_size"])
    pending = np.flatnonzero(group["index/done"][:] != 1)
    dtype = STORAGE_DTYPES[config.dtype]
    loader = DataLoader(
        _ImageSource(dataset, pending, info.preprocess), batch_size=config.batch_size,
        num_workers=config.num_workers, collate_fn=list,
        persistent_workers=False, prefetch_factor=4 if config.num_workers else None,
    )
    buffers: dict[int, list[ImageRecord]] = {}
    written = 0
    with progress_bar(progress) as bar:
        task = bar.add_task(f"extract {split}", total=plan.num_images, completed=plan.num_images - len(pending),
                            status=f"{info.family} on {device.type}")
        for items in loader:
            for item in items:
                if "error" in item:
                    raise MfcacheError(item["error"])
            pixel_values, pixel_mask = pad_batch([item["input"] for item in items], info.preprocess.pad_divisor)
            out_batch = model(pixel_values.to(device), pixel_mask.to(device))
            top = select_topk(out_batch, topk, sigmoid=info.sigmoid)
            for b, item in enumerate(items):
                i = item["position"]
                record = image_record(
                    out_batch, top, b, level_hw=plan.level_hw[i], input_hw=tuple(plan.input_hw[i].tolist()),
                    gt=item["gt"], target_size=config.target_size, dtype=dtype,
                )
                start = i - i % block
                buffers.setdefault(start, []).append(record)
                if len(buffers[start]) == min(block, plan.num_images - start):
                    writer.write(start, buffers.pop(start))
                    written += min(block, plan.num_images - start)
            bar.advance(task, len(items))
    if buffers:  # only possible if blocks were partly done before, which writes never leave
        raise MfcacheError(f"internal error: unfinished blocks {sorted(buffers)}")
    return ExtractSummary(split=split, num_images=plan.num_images, written=written, cache=Path(out))
