"""Pieces shared by the benchmark scripts (gpu_check.py, paper_scale.py, peers.py): random-weight
native detector checkpoints, COCO-sized synthetic images, what a cache takes on disk, the
training-query threshold of a random-weight detector's cache, peak memory, JSON and table
formatting."""

from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

COCO_HW = (480, 640)  # the most common COCO image size (h, w): an 800 x 1067 input at 800 / 1333
PAPER_EDGES = (800, 1333)  # the paper's resize rule (shortest, longest edge)


# ----------------------------------------------------------------------------- detectors
def write_native_checkpoint(
    folder: Path, family: str, *, shortest_edge: int, longest_edge: int | None = None, options: dict | None = None
) -> str:
    """An H-DETR or DINO checkpoint (``family`` "hdetr" | "dino") in the original repo's layout
    (``{"model": state}``), random weights scaled by
    :func:`mfcache.detectors.native.checkpoint.random_state_dict` (the compute of a trained
    model), labelled with the shapes categories; returns its spec. ``options``: architecture
    options (default: the published R50 model; H-DETR: two-stage + box refine + mixed selection,
    300 queries; DINO-4scale: 900 queries)."""
    from mfcache.data.shapes import CATEGORIES
    from mfcache.detectors.native import FAMILIES
    from mfcache.detectors.native.checkpoint import random_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    options = dict(options or {})
    labels = folder / "labels.json"
    labels.write_text(json.dumps(["N/A", *CATEGORIES]))  # index = shapes category id
    config_cls, model_cls = FAMILIES[family]
    model = model_cls(config_cls(**options, num_classes=1 + len(CATEGORIES)))
    state = random_state_dict(
        {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    )
    path = folder / f"{family}.pth"
    torch.save({"model": state, "epoch": 0}, path)
    longest_edge = longest_edge or shortest_edge * 5 // 3
    query = {**options, "labels": labels, "shortest_edge": shortest_edge, "longest_edge": longest_edge}
    return f"{family}:{path}?" + "&".join(f"{k}={v}" for k, v in query.items())


# ----------------------------------------------------------------------------- data
def write_coco_sized_dataset(out: Path, *, images: int, hw: tuple[int, int] = COCO_HW, seed: int = 0) -> Path:
    """``images`` shapes images of exactly ``hw`` pixels (h, w) in ``out/train`` with their COCO
    file ``out/annotations/train.json`` (returned): the shapes generator draws square images of
    side min(hw); each is padded on the right / bottom with its edge colour to ``hw``, and its
    RLE masks re-encoded at the new size (boxes and areas are unchanged)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from mfcache.data.shapes import write_shapes_dataset

    h, w = hw
    paths = write_shapes_dataset(out, num_train=images, num_val=1, seed=seed, min_size=min(hw), max_size=min(hw))
    shutil.rmtree(paths["val_images"])
    paths["val"].unlink()
    coco = json.loads(paths["train"].read_text())
    for entry in coco["images"]:
        file = paths["train_images"] / entry["file_name"]
        pixels = np.asarray(Image.open(file).convert("RGB"))
        padded = np.pad(pixels, ((0, h - pixels.shape[0]), (0, w - pixels.shape[1]), (0, 0)), mode="edge")
        Image.fromarray(padded).save(file)
        entry.update(height=h, width=w)
    for ann in coco["annotations"]:
        if isinstance(ann["segmentation"], dict):
            m = mask_utils.decode(ann["segmentation"])
            m = np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1])))
            rle = mask_utils.encode(np.asfortranarray(m))
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    paths["train"].write_text(json.dumps(coco))
    return paths["train"]


def subset_annotations(annotations: Path, images: int, out: Path) -> Path:
    """A copy of a COCO file with only its first ``images`` images (and their annotations)."""
    coco = json.loads(annotations.read_text())
    keep = {im["id"] for im in coco["images"][:images]}
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    out.write_text(json.dumps(coco))
    return out


# ----------------------------------------------------------------------------- caches
def disk_bytes(folder: Path) -> tuple[int, int]:
    """(bytes on disk as du counts them, apparent bytes) of the files under ``folder``."""
    files = [p.stat() for p in folder.rglob("*") if p.is_file()]
    return sum(s.st_blocks * 512 for s in files), sum(s.st_size for s in files)


def cache_bytes(cache: Path) -> dict:
    """What a written cache takes on disk (``du``), split into the part that grows with the
    images (``per_image_arrays``: the chunk files of every split array but the stored
    annotation file) and the fixed rest (``fixed``: zarr metadata, the annotation file, an
    exported C1 stem, the lock), so that per-image bytes measured on a few images hold for 118k."""
    from mfcache.cache.reader import Cache

    splits = set(Cache(cache).splits)
    grows = fixed = 0
    for path in cache.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_blocks * 512
        parts = path.relative_to(cache).parts  # split / array path / c / chunk key
        if parts[0] in splits and "c" in parts[2:-1] and parts[1] != "annotations":
            grows += size
        else:
            fixed += size
    return {"per_image_arrays": grows, "fixed": fixed, "total": grows + fixed}


def positives_threshold(cache, target: int) -> tuple[float, float]:
    """(train.min_iou, queries per image that train at it): the IoU at which about ``target``
    queries per image (each query once, as training selects them) have a matched GT; at most
    0.5 (the default), at least 0.01. Ties at the threshold can give more. A random-weight
    detector's boxes rarely reach the default 0.5, and the head's cost grows with the queries
    it trains on, so benchmarks aim at a stated number instead."""
    split = cache.split("train")
    per_image = []
    for i in range(split.num_rows):
        s = split.read(i, levels=(split.stored_levels[-1],), c1=False, targets=True)
        best: dict[int, float] = {}
        for q, g, iou in zip(s.query_index.tolist(), s.gt_id.tolist(), s.gt_iou.tolist()):
            if g >= 0:
                best[q] = max(best.get(q, 0.0), iou)
        per_image.append(sorted(best.values(), reverse=True))
    everything = sorted((v for values in per_image for v in values), reverse=True)
    wanted = target * len(per_image)
    threshold = everything[min(wanted, len(everything)) - 1] if everything else 0.5
    threshold = float(min(0.5, max(0.01, threshold)))
    return threshold, sum(v >= threshold for values in per_image for v in values) / max(1, len(per_image))


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory (GiB) while the ``with`` block runs: on CUDA ``torch.cuda.max_memory_allocated``
    (reset on entry), on the CPU this process's peak resident set
    (:class:`mfcache.stages.sweep.ResidentPeak`; DataLoader worker processes are not counted)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gib: float | None = None
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS of this process"

    def __enter__(self) -> PeakMemory:
        from mfcache.stages.sweep import ResidentPeak

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._resident = ResidentPeak().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self._resident.__exit__(*exc)
            self.gib = None if self._resident.peak_mb is None else self._resident.peak_mb / 1024


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run alternately ``repeats`` times after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- output
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_report(out: Path, stem: str, results: dict, table: str) -> str:
    """``out/<stem>.json`` (:func:`clean` results) and ``out/<stem>.md`` (``table``); returns ``table``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(clean(results), indent=2))
    (out / f"{stem}.md").write_text(table + "\n")
    return table


def clean(value):
    """JSON-safe: numpy scalars to Python, non-finite floats to None, paths to str; keys that
    start with ``_`` (a run's private hand-offs) dropped."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
