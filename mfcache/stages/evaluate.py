"""Stage 3: COCO segm + bbox AP of a trained head on a cache split (the detector is never loaded).

Results never depend on ``eval.batch_size``: every image's masks come from its own maps
(:mod:`mfcache.cache.sample`). Images skipped at extraction are left out of the score (their
GT would otherwise count as misses) and listed in ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mfcache.cache.reader import Cache, CacheDataset, CacheSplit
from mfcache.cache.sample import Batch, on_device
from mfcache.config import RunConfig, resolve_run_config
from mfcache.errors import MfcacheError
from mfcache.heads import MaskHead
from mfcache.metrics import coco_evaluate
from mfcache.outputs import atomic_write, check_file, write_errors
from mfcache.runtime import console, progress_bar, resolve_device
from mfcache.stages.categories import subset_summary
from mfcache.stages.postprocess import batch_results
from mfcache.stages.runs import CHECKPOINTS, load_run, read_checkpoint, run_progress, unfinished_line


def metrics_path(run_dir: Path, checkpoint: str = "last") -> Path:
    """Where ``eval`` writes by default: ``RUN/metrics.json``, ``RUN/metrics_best.json`` for
    ``best.pt`` (so the two never overwrite each other)."""
    return Path(run_dir) / ("metrics.json" if checkpoint == "last" else f"metrics_{checkpoint}.json")


@torch.no_grad()
def predict_split(
    head: MaskHead,
    config: RunConfig,
    data: CacheSplit,
    device: torch.device,
    progress: bool = True,
    box_filled: bool = False,
) -> dict[str, list[dict]]:
    """COCO results for every image of ``data``: ``{"head": [...]}`` and, with
    ``box_filled``, the same detections with each mask set to its whole box."""
    dataset = CacheDataset(data.cache.path, data.name, levels=head.levels, c1=head.uses_c1, targets=False)
    loader = DataLoader(
        dataset, batch_size=config.eval.batch_size, collate_fn=Batch.collate, pin_memory=device.type == "cuda"
    )
    to_category = torch.as_tensor(data.label_to_category)
    results: dict[str, list[dict]] = {"head": [], **({"box_filled": []} if box_filled else {})}
    with progress_bar(progress) as bar:
        task = bar.add_task(f"eval {data.name}", total=len(dataset), status="")
        for batch in on_device(loader, device):
            for image in batch_results(head, batch, to_category, config, box_filled):
                for key, items in image.items():
                    results[key] += items
            bar.advance(task, len(batch))
    return results


def evaluate(
    *,
    cache_path: Path,
    run_dir: Path,
    split: str | None = None,
    out: Path | None = None,
    box_filled: bool = True,
    progress: bool = True,
    device: str = "auto",
    overrides: list[str] | None = None,
    force: bool = False,
    checkpoint: str = "last",
    on_results: Callable[[CacheSplit, list[dict]], None] | None = None,
) -> dict:
    """COCO segm + bbox AP of a trained head on a cache split; writes ``metrics.json``
    (default: :func:`metrics_path`) and returns the metrics. ``checkpoint``: the run's
    ``last`` head or its ``best`` (``best.pt``, kept by ``train.eval_every``); the metrics
    name it and its step. ``overrides``: ``--set eval.*`` strings (the run's eval settings
    otherwise). An existing metrics file is replaced only if it holds metrics of the same
    cache (:func:`check_previous`) or with ``force``. ``on_results(split, results)``, if
    given, receives the head's COCO results once the metrics are written (e.g. to draw them).
    A run trained on some categories (``train.categories``) also gets ``category_subset``: the
    mean AP of the learned and of the held-out categories (:func:`subset_summary`).

    A run that has not reached its last step (still training, or stopped early) is evaluated
    as it is, with a one-line warning on stderr naming the step; ``metrics.json`` always
    records ``step`` (of the head evaluated), ``steps`` (the run's schedule) and ``finished``
    (:func:`~mfcache.stages.runs.run_progress`)."""
    out = Path(out) if out else metrics_path(run_dir, checkpoint)
    check_file(out, "`evaluate.out` (the metrics file)")  # now, not after the whole evaluation
    cache = Cache(cache_path)
    data = cache.split(split, role="eval")
    data.require_complete()
    torch_device = resolve_device(device)
    state = read_checkpoint(Path(run_dir), torch_device, checkpoint)
    run = load_run(Path(run_dir), cache.fingerprint, torch_device, state=state)  # a head of another cache: first
    source = cache_record(cache, data)
    if not force:
        check_previous(out, source)
    config = eval_config(run.config, overrides)
    trained = run_progress(Path(run_dir), state, checkpoint)
    if not trained["finished"]:  # before the work: the user may rather wait for the run
        console.print(
            f"[bold yellow]warning:[/bold yellow] {unfinished_line(Path(run_dir), trained, checkpoint)}",
            highlight=False,
            soft_wrap=True,
        )
    results = predict_split(run.head, config, data, torch_device, progress=progress, box_filled=box_filled)
    metrics = {
        **score(data, results),
        "detector": {"spec": cache.detector.spec, "trained": cache.detector.trained},
        "config": config.to_dict(),
        "cache": source,
        "checkpoint": {"file": CHECKPOINTS[checkpoint], "step": state["step"]},
        "step": trained["step"],
        "steps": trained["steps"],
        "finished": trained["finished"],
    }
    if run.config.train.categories and "per_category" in metrics:  # learned vs held-out categories
        metrics["category_subset"] = subset_summary(metrics["per_category"], run.config.train.categories)
    with write_errors("the metrics", out):
        out.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a full disk leaves no truncated metrics.json
    atomic_write(out, json.dumps(metrics, indent=2, default=_json_default).encode(), "the metrics")
    if on_results is not None:
        with write_errors("the visualisations", out.parent):
            on_results(data, results["head"])
    return metrics


def cache_record(cache: Cache, data: CacheSplit) -> dict:
    """What metrics.json records of the cache it was computed on: ``path`` (as it was then),
    ``fingerprint_sha256`` (sha256 of the fingerprint's canonical JSON: detector, weights,
    preprocessing, extract options) and ``annotations_sha256`` (the split's annotation file)."""
    canonical = json.dumps(cache.fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    where = str(Path(cache.path).resolve()) if cache.location.is_local else str(cache.location)
    return {
        "path": where,
        "fingerprint_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "annotations_sha256": data.attrs.get("annotations_sha256"),
    }


def check_previous(out: Path, source: dict) -> None:
    """Refuse (one line, before any work) to replace ``out`` unless it is absent, holds
    metrics of the cache ``source`` describes (:func:`cache_record`: same fingerprint and
    annotations, wherever the cache now is), or metrics from before mfcache recorded their
    cache (nothing to compare). ``--force`` skips this check."""
    if not out.is_file():
        return
    try:
        previous = json.loads(out.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or "segm" not in previous:
        raise MfcacheError(
            f"{out} exists and is not a metrics file mfcache wrote; pass `evaluate.force` to overwrite it, "
            "or `evaluate.out` to write elsewhere"
        )
    theirs = previous.get("cache")
    keys = ("fingerprint_sha256", "annotations_sha256")
    if isinstance(theirs, dict) and any(theirs.get(k) != source[k] for k in keys):
        raise MfcacheError(
            f"{out} holds metrics of another cache ({theirs.get('path')}, detector "
            f"{previous.get('detector', {}).get('spec')!r}); pass `evaluate.force` to overwrite them, or "
            "`evaluate.out` to write elsewhere"
        )


def eval_config(config: RunConfig, overrides: list[str] | None) -> RunConfig:
    """A run's config with ``--set eval.*`` overrides applied (how its masks are turned into
    results); anything else is what the head was trained with and cannot change here."""
    others = [o for o in overrides or [] if not o.strip().startswith("eval.")]
    if others:
        raise MfcacheError(
            f"eval takes only `overrides` eval.* options (the head was trained with the rest): {', '.join(others)}"
        )
    return resolve_run_config(None, overrides, base=config) if overrides else config


def score(data: CacheSplit, results: dict[str, list[dict]]) -> dict:
    """COCO AP of ``results`` (``{"head": [...]}``, optionally ``"box_filled"``) on the split's
    finished images, with what was left out of the score, and the head's AP per category
    (``per_category``); class-agnostic AP (every category one class, none per category) for a
    class-agnostic cache."""
    coco_gt = data.coco()
    evaluated = data.index["image_id"][data.complete_rows].tolist()  # images skipped at extraction are not scored
    agnostic = data.class_agnostic  # all GT and results one class (mfcache.data.labels)
    metrics = coco_evaluate(coco_gt, results["head"], image_ids=evaluated, class_agnostic=agnostic, per_category=True)
    if "box_filled" in results:
        metrics["box_filled"] = {
            "segm": coco_evaluate(
                coco_gt, results["box_filled"], iou_types=("segm",), image_ids=evaluated, class_agnostic=agnostic
            )["segm"]
        }
    return {
        **metrics,
        "split": data.name,
        "num_images": len(evaluated),
        "class_agnostic": agnostic,
        "skipped_images": sorted(data.skipped),
        "skipped_annotations": sorted(data.skipped_annotations),  # left out of the GT at extract
        "num_detections": len(results["head"]),
    }


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value)}")
