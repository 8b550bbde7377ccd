"""Inference on arbitrary images: the frozen detector, then a trained mask head.

Each image goes through exactly the path training data took: the detector's outputs are
cropped, stored and served back as the cache does (:mod:`mfcache.cache.records`: the cache's
dtype, int8 quantised per image and channel), batched by :meth:`~mfcache.cache.sample.Batch.collate`
(which records each image's valid map sizes, so the head sees each image alone whatever its
batch mates) and post-processed by :mod:`mfcache.stages.postprocess`, as evaluation does. Predicting on an image the cache
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mfcache.cache.reader import Cache
from mfcache.cache.records import crop_outputs, image_record, served_sample
from mfcache.cache.sample import Batch
from mfcache.cache.schema import ExtractSettings, fingerprint
from mfcache.data.transforms import load_image, to_input
from mfcache.data.labels import AGNOSTIC_CATEGORY
from mfcache.detectors import load_detector, run_detector
from mfcache.detectors.base import DetectorInfo, level_shapes, select_topk
from mfcache.errors import MfcacheError
from mfcache.heads import MaskHead
from mfcache.paths import inside
from mfcache.runtime import progress_bar, resolve_device
from mfcache.stages.postprocess import Instances, batch_instances
from mfcache.stages.runs import LoadedRun, load_run, read_checkpoint, read_run_info
from mfcache.stages.visualize import overlay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass
class PredictSummary:
    """What ``predict_images`` wrote; ``per_image``: per input image (ids 1..N in input order)
    ``{"image_id", "file", "detections", "drawn", "overlay"}``, ``drawn`` counting the
    detections at or above the overlay threshold."""

    num_images: int
    num_detections: int
    results: Path
    images: Path
    overlays: Path
    per_image: list[dict]


@dataclass
class Segmenter:
    """A frozen detector and a trained head, loaded once (for ``predict`` and
    :class:`mfcache.api.Predictor`): the detector on the pixel path of the cache the head
    learned from, the head in eval mode, the run's detector label -> dataset category map
    ``[num labels]`` (-1 = none) and the categories' names."""

    model: torch.nn.Module
    run: LoadedRun
    extract: ExtractSettings
    device: torch.device
    to_category: torch.Tensor
    category_names: dict[int, str]


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


def run_categories(run_dir: Path, info: DetectorInfo, extract: ExtractSettings) -> tuple[torch.Tensor, dict[int, str]]:
    """Detector label -> dataset category id ``[num labels]`` (-1 = none) and the category
    names, as recorded in the split the run was trained on (``extract``: that cache's settings);
    class-agnostic runs put every detection in :data:`AGNOSTIC_CATEGORY`; labels 1..K if
    the cache moved."""
    if extract.agnostic:
        return torch.full((len(info.label_names),), AGNOSTIC_CATEGORY[0]), dict([AGNOSTIC_CATEGORY])
    meta = read_run_info(run_dir)
    try:
        split = Cache(meta["cache"]).split(meta["split"])
        return (torch.as_tensor(split.label_to_category, dtype=torch.int64),
                {int(k): v for k, v in split.attrs["category_names"].items()})
    except (TypeError, KeyError, ValueError, MfcacheError):  # the cache moved or is gone: fall back
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


def load_segmenter(run_dir: Path, *, detector: str | None = None, device: str = "auto") -> Segmenter:
    """The head of ``run_dir`` and the detector ``detector`` (a spec; None: the one the run's
    cache was extracted with, as recorded in its fingerprint), refused unless that detector
    (weights, preprocessing) is the one the head learned from."""
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    state = read_checkpoint(run_dir, torch_device)
    extract = ExtractSettings.from_fingerprint(state["fingerprint"])  # of the cache the head was trained on
    spec = detector or state["fingerprint"]["detector"]["spec"]
    try:  # that cache's pixel path: the head learned from those outputs
        model = load_detector(spec, device=torch_device, resize=extract.resize)
    except MfcacheError as exc:
        if detector:
            raise
        raise MfcacheError(f"{exc} (the detector the run's cache was extracted with: name it as it is now with "
                           "--detector, or detector= in the Python API)") from None
    run = load_run(run_dir, fingerprint(model.info, **extract.options()), torch_device, state=state,
                   detector=model.info.spec)
    to_category, category_names = run_categories(run_dir, model.info, extract)
    return Segmenter(model=model, run=run, extract=extract, device=torch_device, to_category=to_category,
                     category_names=category_names)


@torch.no_grad()
def segment(segmenter: Segmenter, pixels: dict[int, torch.Tensor], *, min_score: float = 0.0) -> list[Instances]:
    """The :class:`Instances` of each image of ``pixels`` (``{image_id: uint8 [3, H, W]}``, run
    through the detector as one batch), keeping detections scoring at least ``min_score``."""
    s = segmenter
    batch = detect(s.model, pixels, extract=s.extract, head=s.run.head, device=s.device).to(s.device)
    found = batch_instances(s.run.head, batch, s.to_category, s.run.config, min_score=min_score)
    return [replace(f, category_names=s.category_names) for f in found]


def predict_images(*, detector: str | None = None, run_dir: Path, inputs: Sequence[str | Path], out: Path,
                   score_threshold: float = 0.3, device: str = "auto", batch_size: int = 1,
                   progress: bool = True) -> PredictSummary:
    """Segment the images ``inputs`` (files or folders) with detector spec ``detector`` (None:
    the run's, :func:`load_segmenter`) and the head of ``run_dir``; writes
    ``out/results.json``, ``out/images.json`` and ``out/overlays/*.png`` (image ids are 1..N
    in input order) and returns a summary."""
    paths = expand_inputs(inputs)
    segmenter = load_segmenter(Path(run_dir), detector=detector, device=device)
    category_names = segmenter.category_names
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _overlay_names(paths)
    overlays = [inside(out, Path("overlays") / name, what="overlay") for name in names]  # before any work
    stage = Path(tempfile.mkdtemp(prefix=".predict-", dir=out))
    try:
        (stage / "overlays").mkdir()
        results, images, per_image = [], [], []
        with progress_bar(progress) as bar:
            status = f"{segmenter.model.info.family} on {segmenter.device.type}"
            task = bar.add_task("predict", total=len(paths), status=status)
            for start in range(0, len(paths), batch_size):
                chunk = list(enumerate(paths[start: start + batch_size], start=start + 1))
                pixels = {image_id: load_image(path) for image_id, path in chunk}
                for (image_id, path), found in zip(chunk, segment(segmenter, pixels)):
                    results += found.to_coco(image_id)
                    height, width = found.image_size
                    images.append({"id": image_id, "file_name": str(path.resolve()), "height": height, "width": width})
                    drawn = found[found.scores >= score_threshold]
                    _draw(pixels[image_id], drawn).save(stage / "overlays" / names[image_id - 1])
                    per_image.append({"image_id": image_id, "file": str(path), "detections": len(found),
                                      "drawn": len(drawn), "overlay": str(overlays[image_id - 1])})
                bar.advance(task, len(chunk))
        categories = [{"id": cid, "name": name} for cid, name in sorted(category_names.items())]
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
                          images=out / "images.json", overlays=out / "overlays", per_image=per_image)


def detect(model, pixels: dict[int, torch.Tensor], *, extract: ExtractSettings, head: MaskHead,
           device: torch.device) -> Batch:
    """The detector's outputs for a few images (``{image_id: uint8 [3, H, W]}``) as the head
    would read them from a cache made with ``extract``: top-k detections, stored in the
    cache's dtype and served back (:mod:`mfcache.cache.records`), batched as the reader
    batches (CPU tensors)."""
    info = model.info
    inputs = [to_input(image, info.preprocess) for image in pixels.values()]
    outputs = run_detector(model, inputs, device=device, amp=extract.amp)  # as the cache was made
    top = select_topk(outputs, extract.topk, sigmoid=info.sigmoid, agnostic=extract.agnostic)
    stored = list(extract.levels)
    samples = []
    for b, (image_id, image) in enumerate(pixels.items()):
        input_hw = tuple(inputs[b].shape[1:])
        level_hw = np.asarray(level_shapes(input_hw, info.strides))
        crop = crop_outputs(outputs, top, b, level_hw=level_hw, input_hw=input_hw, image_id=image_id,
                            orig_hw=image.shape[1:]).cpu()
        if not head.uses_c1:
            crop.c1 = None
        record = image_record(crop, gt=None, target_size=extract.target_size, dtype=extract.dtype,
                              levels=stored)
        samples.append(served_sample(record, image_id=image_id, input_hw=input_hw, orig_hw=image.shape[1:],
                                     level_hw=level_hw[stored], wanted=[stored.index(l) for l in head.levels]))
    return Batch.collate(samples)


def _draw(image: torch.Tensor, found: Instances):
    """Overlay of one image's instances on its pixels (``uint8 [3, H, W]``)."""
    return overlay(image, found.masks, found.boxes, found.names, found.scores)
