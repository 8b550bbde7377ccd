"""Inference on arbitrary images: the frozen detector, then a trained mask head.

Each image goes through exactly the path training data took: the detector's outputs are
cropped and stored as extraction caches them (:func:`mfcache.extract.stored_features`:
the cache's dtype, int8 quantised per image and channel), read back as the reader serves
them, batched with the cache reader's :func:`~mfcache.cache.reader.collate` (which records
each image's valid map sizes, so the head sees each image alone whatever its batch mates)
and post-processed by :func:`mfcache.engine.image_results`. Predicting on an image the cache
holds therefore gives exactly the results ``mfcache eval`` computes for it, at any
``eval.batch_size``, when ``--batch-size`` groups images as extraction's detector batches did
(the detector's own floating point differs in the last bits between batch sizes).

``OUT/results.json`` holds every detection (COCO results: COCO AP needs the full ranking);
``OUT/images.json`` is a COCO file with the images (id, file_name, height, width), the
categories and no annotations, so ``COCO("images.json").loadRes("results.json")`` works;
``OUT/overlays/<stem>.png`` draws the detections scoring at least ``score_threshold``.
Everything is staged in a hidden folder and moved into place only once all images are done.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mfcache.cache.reader import Cache, collate
from mfcache.cache.schema import QUANTIZED, dequantize, fingerprint, fingerprint_mismatch, stored_resize
from mfcache.checkpoint_io import load_checkpoint
from mfcache.config import RunConfig
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.detectors import load_detector
from mfcache.detectors.base import DetectorInfo, level_shapes, select_topk
from mfcache.engine import CHECKPOINT, image_results, kept_queries, mask_probs
from mfcache.engine import _to as to_device
from mfcache.errors import MfcacheError
from mfcache.extract import STORAGE_DTYPES, crop_outputs, stored_features
from mfcache.heads import MaskHead, build_head
from mfcache.paths import inside
from mfcache.runtime import progress_bar, resolve_device
from mfcache.visualize import decode_results, overlay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass
class PredictSummary:
    num_images: int
    num_detections: int
    results: Path
    images: Path
    overlays: Path


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (by suffix, sorted by name)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise MfcacheError(f"no such image or folder: {item}")
    if not paths:
        raise MfcacheError(f"no image files in {', '.join(map(str, inputs)) or 'the arguments'}")
    return paths


@dataclass
class LoadedRun:
    """A run folder's head, ready for a detector: ``to_category [num labels]`` (-1 = no
    category) and ``category_names`` (id -> name)."""

    head: MaskHead
    config: RunConfig
    extract: dict
    to_category: torch.Tensor
    category_names: dict[int, str]


def read_run_checkpoint(run_dir: Path, device: torch.device) -> dict:
    """The checkpoint dict of run folder ``run_dir`` (head weights, config, the fingerprint
    of the cache it was trained on)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise MfcacheError(f"no trained head in {run_dir} (expected {CHECKPOINT}; run `mfcache train`)")
    return load_checkpoint(path, what="run checkpoint", map_location=device)


def load_run_for_detector(run_dir: Path, info: DetectorInfo, device: torch.device,
                          state: dict | None = None) -> LoadedRun:
    """The trained head of ``run_dir`` (its checkpoint ``state``, read if not given), checked
    against detector ``info`` (the detector part of the fingerprint of the cache it was
    trained on). Categories come from that cache's split if it still exists, else detector
    label ``i`` is category ``i + 1``."""
    run_dir = Path(run_dir)
    state = read_run_checkpoint(run_dir, device) if state is None else state
    stored = state["fingerprint"]
    problem = fingerprint_mismatch(stored, fingerprint(info, **stored["extract"]))
    if problem:
        raise MfcacheError(f"the head in {run_dir} was trained on a cache made with {problem}, "
                           f"not with detector {info.spec!r}")
    config = RunConfig.from_dict(state["config"])
    c1_channels = info.c1_channels if stored["extract"]["c1"] != "none" else 0
    head = build_head(config.head, d_model=info.d_model, c1_channels=c1_channels, num_levels=len(info.strides))
    head.load_state_dict(state["model"])
    to_category, names = _categories(run_dir, info)
    return LoadedRun(head.to(device).eval(), config, stored["extract"], to_category, names)


def _categories(run_dir: Path, info: DetectorInfo) -> tuple[torch.Tensor, dict[int, str]]:
    """The label -> category map recorded in the run's cache split, or labels 1..K."""
    try:
        meta = json.loads((run_dir / "config.json").read_text())
        split = Cache(meta["cache"]).split(meta["split"])
        return (torch.as_tensor(split.label_to_category, dtype=torch.int64),
                {int(k): v for k, v in split.attrs["category_names"].items()})
    except (OSError, KeyError, ValueError, MfcacheError):  # the cache moved or is gone: fall back
        return (torch.arange(1, len(info.label_names) + 1),
                {i + 1: name for i, name in enumerate(info.label_names)})


def _overlay_names(paths: list[Path]) -> list[str]:
    """``<stem>.png`` per image; a repeated stem gets ``-<image_id>`` appended."""
    seen: set[str] = set()
    names = []
    for image_id, path in enumerate(paths, start=1):
        name = path.stem if path.stem not in seen else f"{path.stem}-{image_id}"
        seen.add(name)
        names.append(f"{name}.png")
    return names


@torch.no_grad()
def predict_images(*, detector: str, run_dir: Path, inputs: Sequence[str | Path], out: Path,
                   score_threshold: float = 0.3, device: str = "auto", batch_size: int = 1,
                   progress: bool = True) -> PredictSummary:
    """Segment the images ``inputs`` (files or folders) with detector spec ``detector`` and the
    head of ``run_dir``; writes ``out/results.json``, ``out/images.json`` and
    ``out/overlays/*.png`` (image ids are 1..N in input order) and returns a summary."""
    paths = expand_inputs(inputs)
    torch_device = resolve_device(device)
    state = read_run_checkpoint(Path(run_dir), torch_device)
    # the pixel path of the cache the head was trained on: the head learned from those outputs
    model = load_detector(detector, device=torch_device, resize=stored_resize(state["fingerprint"]))
    info = model.info
    run = load_run_for_detector(Path(run_dir), info, torch_device, state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _overlay_names(paths)
    overlays = [inside(out, Path("overlays") / name, what="overlay") for name in names]  # before any work
    stage = Path(tempfile.mkdtemp(prefix=".predict-", dir=out))
    try:
        (stage / "overlays").mkdir()
        results, images = [], []
        with progress_bar(progress) as bar:
            task = bar.add_task("predict", total=len(paths), status=f"{info.family} on {torch_device.type}")
            for start in range(0, len(paths), batch_size):
                chunk = list(enumerate(paths[start: start + batch_size], start=start + 1))
                pixels = {image_id: load_image(path) for image_id, path in chunk}
                batch = _detect(model, info, run, pixels, torch_device)
                prob, quality = mask_probs(run.head, batch, kept_queries(
                    batch["labels"], run.to_category, run.config.eval.max_detections))
                for b, (image_id, path) in enumerate(chunk):
                    found = image_results(batch, b, prob[b], run.to_category, run.config,
                                          quality=None if quality is None else quality[b])["head"]
                    results += found
                    height, width = pixels[image_id].shape[1:]
                    images.append({"id": image_id, "file_name": str(path.resolve()), "height": height, "width": width})
                    _draw(pixels[image_id], [r for r in found if r["score"] >= score_threshold],
                          run.category_names).save(stage / "overlays" / names[image_id - 1])
                bar.advance(task, len(chunk))
        categories = [{"id": cid, "name": name} for cid, name in sorted(run.category_names.items())]
        (stage / "results.json").write_text(json.dumps(results))
        (stage / "images.json").write_text(json.dumps({"images": images, "categories": categories,
                                                       "annotations": []}, indent=1))
        (out / "overlays").mkdir(exist_ok=True)
        for name, target in zip(names, overlays):
            shutil.move(stage / "overlays" / name, target)
        for name in ("results.json", "images.json"):
            shutil.move(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return PredictSummary(num_images=len(paths), num_detections=len(results), results=out / "results.json",
                          images=out / "images.json", overlays=out / "overlays")


def _detect(model, info: DetectorInfo, run: LoadedRun, pixels: dict[int, torch.Tensor],
            device: torch.device) -> dict:
    """Detector outputs of a few images, cropped, stored and read back as the run's cache
    would (its dtype; int8 quantised and dequantised per image and channel) and collated
    exactly as the cache reader serves them to the head (on ``device``)."""
    inputs = [to_input(image, info.preprocess) for image in pixels.values()]
    pixel_values, pixel_mask = pad_batch(inputs, info.preprocess)
    outputs = model(pixel_values.to(device), pixel_mask.to(device))
    top = select_topk(outputs, run.extract["topk"], sigmoid=info.sigmoid)
    stored = run.extract["levels"]
    samples = []
    for b, (image_id, image) in enumerate(pixels.items()):
        input_hw = tuple(inputs[b].shape[1:])
        level_hw = np.asarray(level_shapes(input_hw, info.strides))
        crop = crop_outputs(outputs, top, b, level_hw=level_hw, input_hw=input_hw)
        rows, scales = stored_features(crop, STORAGE_DTYPES[run.extract["dtype"]], stored)
        served = {k: torch.from_numpy(v if scales is None else dequantize(v, scales[QUANTIZED[k]]))
                  for k, v in rows.items()}
        maps = dict(zip(stored, served["memory"].split([int(level_hw[l].prod()) for l in stored])))
        sample = {
            "queries": served["queries"], "boxes": crop["boxes"].cpu(), "scores": crop["scores"].cpu(),
            "labels": crop["labels"].cpu(), "query_index": crop["query_index"].cpu(),
            "levels": [maps[l].reshape(*level_hw[l], -1).permute(2, 0, 1) for l in run.head.levels],
            "input_hw": crop["input_hw"], "orig_hw": torch.as_tensor(tuple(image.shape[1:]), dtype=torch.int64),
            "image_id": image_id,
        }
        if run.head.uses_c1:
            sample["c1"] = served["c1"].reshape(*crop["c1"].shape[1:], -1).permute(2, 0, 1)
        samples.append(sample)
    return to_device(collate(samples), device)


def _draw(image: torch.Tensor, found: list[dict], category_names: dict[int, str]):
    """Overlay of one image's results (COCO result dicts) on its pixels."""
    masks, boxes, scores, categories = decode_results(found, *image.shape[1:])
    return overlay(image, masks, boxes, [category_names.get(c, str(c)) for c in categories], scores)
