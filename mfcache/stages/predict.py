"""Inference on arbitrary images: the frozen detector, then a trained mask head.

Each image goes through exactly the path training data took: the detector's outputs are
cropped and served at the cache's precision (:func:`mfcache.cache.records.as_served`: the
cache's dtype, int8 quantised per image and channel), batched by :meth:`~mfcache.cache.sample.Batch.collate`
(which records each image's valid map sizes, so the head sees each image alone whatever its
batch mates) and post-processed by :mod:`mfcache.stages.postprocess`, as evaluation does. Predicting on an image the cache
holds therefore gives exactly the results ``mfcache eval`` computes for it, at any
``eval.batch_size``, when ``--batch-size`` groups images as extraction's detector batches did
(the detector's own floating point differs in the last bits between batch sizes).

``OUT/results.json`` holds every detection (COCO results: COCO AP needs the full ranking);
``OUT/images.json`` is a COCO file with the images (id, file_name, height, width), the
categories and no annotations, so ``COCO("images.json").loadRes("results.json")`` works;
``OUT/overlays/<name>.png`` draws the detections scoring at least ``score_threshold`` and
``OUT/masks/`` holds them as PNGs if asked (:mod:`mfcache.stages.predict_outputs`; names from
:mod:`mfcache.stages.predict_inputs`). Everything is staged in a hidden folder and moved into place only once all images are done.
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
from mfcache.cache.records import as_served, image_sample
from mfcache.cache.sample import Batch
from mfcache.cache.schema import ExtractSettings, fingerprint
from mfcache.data.labels import AGNOSTIC_CATEGORY
from mfcache.data.transforms import load_image_alpha, to_input
from mfcache.detectors import load_detector, run_detector
from mfcache.detectors.base import DetectorInfo, level_shapes, select_topk
from mfcache.errors import MfcacheError
from mfcache.heads import MaskHead
from mfcache.paths import inside
from mfcache.runtime import console, progress_bar, resolve_device
from mfcache.stages.postprocess import Instances, batch_instances
from mfcache.stages.predict_inputs import ImageInput, find_images
from mfcache.stages.predict_outputs import MASK_MODES, planned_paths, stale_instance_pngs, write_image_outputs
from mfcache.stages.runs import LoadedRun, load_run, read_checkpoint, read_run_info


@dataclass
class PredictSummary:
    """What ``predict_images`` wrote; ``per_image``: per image read (ids 1..N in input order)
    ``{"image_id", "file", "detections", "drawn", "overlay", "masks"}``, ``drawn`` counting the
    detections at or above the overlay threshold, ``overlay`` and ``masks`` the paths written
    (None when not asked for); ``skipped``: ``{"image_id", "file", "error"}`` per image that
    could not be decoded (with ``skip_bad``)."""

    num_images: int
    num_detections: int
    results: Path
    images: Path
    overlays: Path | None
    masks: Path | None
    per_image: list[dict]
    skipped: list[dict]


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
        return (
            torch.as_tensor(split.label_to_category, dtype=torch.int64),
            {int(k): v for k, v in split.attrs["category_names"].items()},
        )
    except (TypeError, KeyError, ValueError, MfcacheError):  # the cache moved or is gone: fall back
        return (torch.arange(1, len(info.label_names) + 1), {i + 1: name for i, name in enumerate(info.label_names)})


def load_segmenter(run_dir: Path, *, detector: str | None = None, device: str = "auto") -> Segmenter:
    """The head of ``run_dir`` and the detector ``detector`` (a spec; None: the one the run's
    cache was extracted with, as recorded in its fingerprint), refused unless that detector
    (weights, preprocessing, the prompt of an open-vocabulary detector) is the one the head learned from."""
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    state = read_checkpoint(run_dir, torch_device)
    extract = ExtractSettings.from_fingerprint(state["fingerprint"])  # of the cache the head was trained on
    spec = detector or state["fingerprint"]["detector"]["spec"]
    try:  # that cache's pixel path: the head learned from those outputs
        model = load_detector(
            spec,
            device=torch_device,
            resize=extract.resize,  # and that cache's prompt
            prompts=state["fingerprint"]["detector"].get("prompts"),
        )
    except MfcacheError as exc:
        if detector:
            raise
        raise MfcacheError(
            f"{exc} (the detector the run's cache was extracted with: name it as it is now with `detector`)"
        ) from None
    run = load_run(
        run_dir, fingerprint(model.info, **extract.options()), torch_device, state=state, detector=model.info.spec
    )
    to_category, category_names = run_categories(run_dir, model.info, extract)
    return Segmenter(
        model=model,
        run=run,
        extract=extract,
        device=torch_device,
        to_category=to_category,
        category_names=category_names,
    )


@torch.no_grad()
def segment(segmenter: Segmenter, pixels: dict[int, torch.Tensor], *, min_score: float = 0.0) -> list[Instances]:
    """The :class:`Instances` of each image of ``pixels`` (``{image_id: uint8 [3, H, W]}``, run
    through the detector as one batch), keeping detections scoring at least ``min_score``."""
    s = segmenter
    batch = detect(s.model, pixels, extract=s.extract, head=s.run.head, device=s.device).to(s.device)
    found = batch_instances(s.run.head, batch, s.to_category, s.run.config, min_score=min_score)
    return [replace(f, category_names=s.category_names) for f in found]


def predict_images(
    *,
    detector: str | None = None,
    run_dir: Path,
    inputs: Sequence[str | Path],
    out: Path,
    score_threshold: float = 0.3,
    device: str = "auto",
    batch_size: int = 1,
    progress: bool = True,
    recursive: bool = False,
    skip_bad: bool = False,
    overlays: bool = True,
    masks: str = "none",
) -> PredictSummary:
    """Segment the images ``inputs`` (files or folders, :func:`find_images`) with detector
    spec ``detector`` (None: the run's, :func:`load_segmenter`) and the head of ``run_dir``;
    writes ``out/results.json``, ``out/images.json``, ``out/overlays/`` (unless not
    ``overlays``) and, with ``masks`` ``instance`` or ``label``, ``out/masks/``
    (:mod:`mfcache.stages.predict_outputs`), and returns a summary. Image ids are 1..N in
    input order. With ``skip_bad`` an image that cannot be decoded is reported (a warning
    line) and left out, its id unused; without, it stops everything."""
    if masks not in MASK_MODES:
        raise MfcacheError(f"unknown `predict.masks` {masks!r}; choose one of {', '.join(MASK_MODES)}")
    out = Path(out)
    items = find_images(inputs, recursive=recursive, exclude=out)
    for item in items:  # before any work: nothing may resolve outside --out
        for path in planned_paths(item.name, overlays=overlays, masks=masks).values():
            if path is not None:
                inside(out, path, what="output")
    segmenter = load_segmenter(Path(run_dir), detector=detector, device=device)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".predict-", dir=out))
    options = {"score_threshold": score_threshold, "overlays": overlays, "masks": masks}
    try:
        results, images, per_image, skipped = _predict_all(
            segmenter, items, stage, batch_size=batch_size, skip_bad=skip_bad, progress=progress, **options
        )
        categories = [{"id": cid, "name": name} for cid, name in sorted(segmenter.category_names.items())]
        (stage / "results.json").write_text(json.dumps(results))
        (stage / "images.json").write_text(
            json.dumps({"images": images, "categories": categories, "annotations": []}, indent=1)
        )
        _publish(stage, out, [item.name for item in items if item.image_id not in skipped], masks=masks)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for record in per_image:  # where each file now is
        for key in ("overlay", "masks"):
            record[key] = str(out / record[key]) if record[key] else None
    return PredictSummary(
        num_images=len(images),
        num_detections=len(results),
        results=out / "results.json",
        images=out / "images.json",
        overlays=out / "overlays" if overlays else None,
        masks=out / "masks" if masks != "none" else None,
        per_image=per_image,
        skipped=[{"image_id": i, "file": str(path), "error": why} for i, (path, why) in skipped.items()],
    )


def _predict_all(
    segmenter: Segmenter,
    items: list[ImageInput],
    stage: Path,
    *,
    batch_size: int,
    skip_bad: bool,
    progress: bool,
    **options,
) -> tuple[list[dict], list[dict], list[dict], dict[int, tuple]]:
    """Run every image of ``items`` and stage its outputs; returns the COCO results, the
    COCO images, the per-image records and ``{image_id: (path, error)}`` of skipped images."""
    results, images, per_image, skipped = [], [], [], {}
    with progress_bar(progress) as bar:
        task = bar.add_task(
            "predict", total=len(items), status=f"{segmenter.model.info.family} on {segmenter.device.type}"
        )
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pixels, alphas = {}, {}
            for item in chunk:
                try:
                    pixels[item.image_id], alphas[item.image_id] = load_image_alpha(
                        item.path, alpha=options["overlays"]
                    )
                except MfcacheError as exc:
                    if not skip_bad:
                        raise MfcacheError(
                            f"{exc} (pass `predict.skip_bad` to skip unreadable images and go on)"
                        ) from None
                    skipped[item.image_id] = (item.path, str(exc))
                    console.print(
                        f"[bold yellow]warning:[/bold yellow] skipped: {exc}", highlight=False, soft_wrap=True
                    )
            found_all = segment(segmenter, pixels) if pixels else []
            for item, found in zip([i for i in chunk if i.image_id in pixels], found_all):
                results += found.to_coco(item.image_id)
                height, width = found.image_size
                images.append(
                    {"id": item.image_id, "file_name": str(item.path.resolve()), "height": height, "width": width}
                )
                drawn = write_image_outputs(
                    stage, item.name, pixels[item.image_id], found, image_alpha=alphas[item.image_id], **options
                )
                per_image.append(
                    {
                        "image_id": item.image_id,
                        "file": str(item.path),
                        "detections": len(found),
                        "drawn": drawn,
                        **planned_paths(item.name, overlays=options["overlays"], masks=options["masks"]),
                    }
                )
            bar.advance(task, len(chunk))
    if not images:
        raise MfcacheError(f"none of the {len(items)} images could be decoded (see the warnings above)")
    return results, images, per_image, skipped


def _publish(stage: Path, out: Path, names: list[str], *, masks: str) -> None:
    """Move everything staged into ``out``, every target checked first (nothing resolves
    outside ``out``); instance mask PNGs a previous run left for these images are removed."""
    moves = [
        (path, inside(out, path.relative_to(stage), what="output"))
        for path in sorted(stage.rglob("*"))
        if path.is_file()
    ]
    if masks == "instance":
        for name in names:
            for old in stale_instance_pngs(out / "masks" / name):
                old.unlink()
    for source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)


def detect(
    model, pixels: dict[int, torch.Tensor], *, extract: ExtractSettings, head: MaskHead, device: torch.device
) -> Batch:
    """The detector's outputs for a few images (``{image_id: uint8 [3, H, W]}``) as the head
    reads them from a cache made with ``extract``: the top-k detections and the head's
    levels (and C1 if it reads it) at the cache's precision (:func:`~mfcache.cache.records.as_served`),
    batched as the reader batches (CPU tensors)."""
    info = model.info
    inputs = [to_input(image, info.preprocess) for image in pixels.values()]
    outputs = run_detector(model, inputs, device=device, amp=extract.amp)  # as the cache was made
    top = select_topk(outputs, extract.topk, sigmoid=info.sigmoid, agnostic=extract.agnostic)
    stored = list(extract.levels)
    samples = []
    for b, (image_id, image) in enumerate(pixels.items()):
        input_hw = tuple(inputs[b].shape[1:])
        sample = image_sample(
            outputs,
            top,
            b,
            level_hw=np.asarray(level_shapes(input_hw, info.strides)),
            input_hw=input_hw,
            image_id=image_id,
            orig_hw=image.shape[1:],
        )
        if not head.uses_c1:
            sample.c1 = None
        wanted = [stored.index(level) for level in head.levels]
        samples.append(
            as_served(sample, dtype=extract.dtype, levels=stored, wanted=wanted, store_c1=extract.c1 == "store")
        )
    return Batch.collate(samples)
