"""Stages 2 and 3: train a mask head from a cache, and evaluate it with COCO AP.

Plain functions and a visible loop (the detector is never loaded here). A run folder holds
``checkpoint.pt`` (model, optimizer, config, step, RNG state, split, the cache's fingerprint), ``config.json``
and ``log.jsonl`` (one line per logged step).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mfcache.cache.reader import Cache, CacheDataset, CacheSplit, collate
from mfcache.cache.schema import fingerprint_mismatch
from mfcache.cache.stats import FEW_MATCHED, MatchStats, split_stats
from mfcache.cache.targets import scale_boxes
from mfcache.checkpoint_io import load_checkpoint
from mfcache.config import RunConfig, resolve_run_config, resume_config
from mfcache.distributed import World, all_sum, close_world, init_world
from mfcache.errors import MfcacheError
from mfcache.evaluation import coco_evaluate, results_from_detections
from mfcache.heads import MaskHead, build_head
from mfcache.losses import mask_losses, point_mask_losses, quality_loss, resize_targets
from mfcache.masks import encode_rle, paste_masks
from mfcache.outputs import check_file, check_folder, write_errors
from mfcache.runtime import console, progress_bar, resolve_device
from mfcache.stopping import Interrupted, StopSignals, ignore_stop_signals

CHECKPOINT = "checkpoint.pt"


def lr_at(step: int, total: int, base: float, drops: tuple[float, ...]) -> float:
    """Step schedule: ``base`` x 0.1 for every fraction in ``drops`` already passed."""
    return base * 0.1 ** sum(step >= int(f * total) for f in drops)


class StepBatches(Sampler):
    """Batch ``s`` of a run is a pure function of (seed, s): a fresh permutation per epoch.
    Resuming at step s therefore sees exactly the batches an uninterrupted run would."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.bs, self.seed, self.start, self.stop = num_items, min(batch_size, num_items), seed, start, stop

    def batch(self, step: int) -> list[int]:
        per_epoch = self.n // self.bs
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[pos * self.bs: (pos + 1) * self.bs].tolist()

    def __iter__(self):
        return (self.batch(s) for s in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def first_detections(query_index: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``query_index``, ``select [B, K]`` -> ``[B, K]`` long: for each detection, the position of
    the first selected detection of the same query (its own position if it is that one).

    A sigmoid-classifier DETR lists one query under several labels (top-k over queries x
    classes), each time with the query's own embedding and box: the same mask-head input, the
    same mask and, in training, the same target. So the head runs on each query once.
    """
    same = (query_index[:, :, None] == query_index[:, None, :]) & select[:, None, :]
    return same.to(torch.uint8).argmax(-1)  # the first True; 0 where none (unselected rows)


def once_per_query(query_index: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` bool: ``select`` keeping only each query's first selected detection."""
    positions = torch.arange(select.shape[1], device=select.device)
    return select & (first_detections(query_index, select) == positions)


def head_for(cache: Cache, config: RunConfig) -> MaskHead:
    return build_head(
        config.head, d_model=cache.detector.d_model,
        c1_channels=cache.detector.c1_channels if cache.extract["c1"] != "none" else 0,
        num_levels=len(cache.detector.strides),
    )


def _to(batch: dict, device: torch.device) -> dict:
    """A collated batch on ``device``; fp16 feature maps (as an fp16 cache stores them) become
    float32 there, so they cross to the device at half the bytes."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        return t.float() if t.dtype == torch.float16 else t

    return {k: [move(t) for t in v] if k == "levels" else move(v) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _save(path: Path, payload: dict) -> None:
    """Write a checkpoint atomically; a full disk is a one-line error, the previous one intact.
    Serialised in memory first: torch.save reports a failed file write as a RuntimeError."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_suffix(".tmp")
    try:
        with write_errors("the checkpoint", path):
            tmp.write_bytes(buffer.getbuffer())
            os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact
    finally:
        tmp.unlink(missing_ok=True)


class RankSlice(Sampler):
    """This rank's share of each global batch of ``batches``: items ``rank::size``, so the
    ranks together see exactly the batches of a one-process run."""

    def __init__(self, batches: StepBatches, world: World):
        if batches.bs < world.size:
            raise MfcacheError(f"train.batch_size={batches.bs} is smaller than the {world.size} torchrun processes")
        self.batches, self.world = batches, world

    def __iter__(self):
        return (b[self.world.rank:: self.world.size] for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def train(*, cache_path: Path, run_dir: Path, config: RunConfig | None = None, overrides: list[str] | None = None,
          split: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train ``config.head`` on a cache split; returns the final log entry, with ``seconds``
    and the ``head`` name (``finished``: the run was already at its last step).

    With ``resume`` the run continues from ``run_dir``'s checkpoint: with ``config`` None it
    takes the configuration stored there, with ``overrides`` (``--set`` strings) applied, and
    the split it was trained on; a changed configuration may only extend the schedule or change
    how the run runs (:func:`mfcache.config.resume_config`). Without ``resume``, ``config``
    None means the defaults with ``overrides``.

    SIGINT (Ctrl-C) or SIGTERM stop the run after the step in progress, save a checkpoint
    there and raise :class:`mfcache.stopping.Interrupted`; resuming from it gives exactly the
    uninterrupted run.

    Under ``torchrun --nproc_per_node N`` the head is wrapped in DistributedDataParallel and
    every rank takes a disjoint slice of each step's batch (the global batch stays
    ``train.batch_size``); each rank's loss is weighted by its share of the step's positives,
    so the averaged gradient equals a one-process run's. Only rank 0 writes the run folder."""
    run_dir = Path(run_dir)
    check_folder(run_dir, "--out (the run folder)")  # a file or a read-only place: before any work
    state = _checkpoint_to_resume(run_dir, resume)
    if state is not None:
        config = resume_config(RunConfig.from_dict(state["config"]), at_step=state["step"], run=run_dir,
                               requested=config, overrides=overrides)
        split = split or state.get("split")
    elif config is None:
        config = resolve_run_config(None, overrides)
    device = resolve_device(config.train.device)
    world, created = init_world(device)
    try:
        return _train(cache_path=cache_path, run_dir=run_dir, config=config, split=split, state=state,
                      progress=progress and world.is_main, world=world, device=world.device(device))
    finally:
        close_world(created)


def _checkpoint_to_resume(run_dir: Path, resume: bool) -> dict | None:
    """The checkpoint dict of the run in ``run_dir`` if it is to be resumed; None for a new run."""
    checkpoint_path = run_dir / CHECKPOINT
    if checkpoint_path.exists():
        if not resume:
            raise MfcacheError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
        return load_checkpoint(checkpoint_path, what="run checkpoint", map_location="cpu")
    if resume:
        raise MfcacheError(f"nothing to resume: no {CHECKPOINT} in {run_dir}")
    return None


def _train(*, cache_path: Path, run_dir: Path, config: RunConfig, split: str | None, state: dict | None,
           progress: bool, world: World, device: torch.device) -> dict:
    cache = Cache(cache_path)
    data = cache.split(split, role="train")
    data.require_complete()
    if state is not None:
        problem = fingerprint_mismatch(state["fingerprint"], cache.fingerprint)
        if problem:
            raise MfcacheError(f"the run in {run_dir} was trained on a cache made with {problem}")
    tc = config.train
    _check_positives(data, tc.min_iou, warn=world.is_main)
    torch.manual_seed(tc.seed)
    head = head_for(cache, config).to(device)
    model = torch.nn.parallel.DistributedDataParallel(head) if world.enabled else head
    optimizer = torch.optim.AdamW(head.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    checkpoint_path = run_dir / CHECKPOINT
    step = 0
    if state is not None:
        head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if "rng" in state:  # random ops after step s match an uninterrupted run's
            torch.set_rng_state(state["rng"])
    if world.is_main:
        with write_errors("the run folder", run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(
                {"config": config.to_dict(), "cache": str(cache_path), "split": data.name}, indent=2))

    dataset = CacheDataset(cache_path, data.name, levels=head.levels, c1=head.uses_c1, targets=True)
    if len(dataset) == 0:
        raise MfcacheError(f"split {data.name!r} has no images to train on")
    batches = StepBatches(len(dataset), tc.batch_size, tc.seed, step, tc.steps)
    loader = DataLoader(dataset, batch_sampler=RankSlice(batches, world) if world.enabled else batches,
                        collate_fn=collate, num_workers=tc.num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals,
                        # its own generator: starting the loader must not draw from the global RNG,
                        # or a resumed run's random ops (point sampling) would be shifted by one draw
                        generator=torch.Generator().manual_seed(tc.seed))

    def checkpoint(at: int) -> None:
        if not world.is_main:
            return
        _save(checkpoint_path, {"model": head.state_dict(), "optimizer": optimizer.state_dict(),
                                "config": config.to_dict(), "step": at, "fingerprint": cache.fingerprint,
                                "rng": torch.get_rng_state(), "split": data.name})

    with write_errors("the training log", run_dir / "log.jsonl"):
        log = (run_dir / "log.jsonl").open("a") if world.is_main else open(os.devnull, "w")
    entry: dict = {"step": step}
    if step >= tc.steps:  # a finished run resumed without a longer schedule: nothing to do
        log.close()
        return {**entry, "finished": True, "seconds": 0.0, "head": config.head.name}
    head.train()
    started = time.perf_counter()
    with StopSignals() as stop, progress_bar(progress) as bar:
        task = bar.add_task("train", total=tc.steps, completed=step, status="")
        for batch in loader:
            batch = _to(batch, device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc.steps, tc.lr, tc.lr_drops)
            select = once_per_query(batch["query_index"], (batch["gt_id"] >= 0) & (batch["gt_iou"] >= tc.min_iou))
            step += 1
            local = int(select.sum())
            positives = int(all_sum(local, device))  # over every rank's slice of the batch
            if positives:
                if not local:  # run one query at weight 0, so every rank's DDP reduces the same graph
                    select = select.clone()
                    select.view(-1)[0] = True
                out = model(batch["queries"], batch["boxes"], batch["levels"], batch.get("c1"), select,
                            level_hw=batch["level_hw"], c1_hw=batch.get("c1_hw"))
                targets = resize_targets(batch["target_masks"][select], head.roi_size)
                hc = config.head
                losses = (point_mask_losses(out.mask_logits, targets, num_points=hc.points,
                                            oversample=hc.oversample, importance=hc.importance)
                          if hc.loss == "point" else mask_losses(out.mask_logits, targets))
                loss = tc.bce_weight * losses["bce"] + tc.dice_weight * losses["dice"]
                if out.quality is not None:  # learned mask-IoU: regress the true IoU at the head's M
                    losses["quality"] = quality_loss(out.quality, out.mask_logits, targets)
                    loss = loss + hc.quality_weight * losses["quality"]
                share = local * world.size / positives  # DDP averages over ranks: this gives the global mean
                if world.enabled:  # the step's losses over the whole batch, as a one-process run logs them
                    losses = {k: torch.tensor(all_sum(v.item() * local, device) / positives) for k, v in losses.items()}
                value = all_sum(loss.item() * local, device) / positives if world.enabled else loss.item()
                if not math.isfinite(value):
                    raise MfcacheError(
                        f"loss became non-finite ({value}) at step {step}; nothing was updated, the last "
                        f"good checkpoint is {checkpoint_path}: lower train.lr or set train.grad_clip and --resume"
                        if checkpoint_path.exists() else f"loss became non-finite ({value}) at step {step}, "
                        "before the first checkpoint: lower train.lr or set train.grad_clip"
                    )
                optimizer.zero_grad(set_to_none=True)
                (loss * share if world.enabled else loss).backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(head.parameters(), tc.grad_clip)
                optimizer.step()
                entry = {"step": step, "loss": value, **{k: v.item() for k, v in losses.items()},
                         "positives": positives, "lr": optimizer.param_groups[0]["lr"]}
            else:  # no query overlaps a GT well enough: nothing to learn from this batch
                entry = {"step": step, "loss": None, "positives": 0, "lr": optimizer.param_groups[0]["lr"]}
            if step % tc.log_every == 0 or step == tc.steps:
                with write_errors("the training log", run_dir / "log.jsonl"):
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint(step)
            loss_text = f"loss {entry['loss']:.4f}" if entry.get("loss") is not None else "no positives"
            bar.update(task, advance=1, status=loss_text)
            if stop.requested(device, world.enabled):  # after a whole step: the checkpoint resumes exactly
                break
    log.close()
    if step < tc.steps or not checkpoint_path.exists():
        checkpoint(step)
    if stop.signum is not None and step < tc.steps:
        raise Interrupted(stop.signum, step, tc.steps, checkpoint_path)
    return {**entry, "seconds": time.perf_counter() - started, "head": config.head.name}


def _check_positives(data: CacheSplit, min_iou: float, warn: bool) -> MatchStats:
    """Refuse a split on which no query would train (no GT instance is a cached query's best
    match at box IoU >= ``min_iou``); warn when fewer than :data:`FEW_MATCHED` of its GT
    instances are (the head learns from those alone, and eval counts the rest as misses)."""
    stats = split_stats(data.group, min_iou)
    where = f"split {data.name!r} of {data.cache.path}"
    if stats.gt_instances == 0:
        raise MfcacheError(f"{where} has no ground-truth instances to train on (its annotation file "
                           f"{data.attrs.get('annotation_file')} lists none)")
    if stats.matched == 0:
        raise MfcacheError(
            f"{where} has nothing to train on: none of its {stats.gt_instances} GT instances is the best match "
            f"of a cached query at box IoU >= train.min_iou={min_iou:g} (the best query-GT IoU is "
            f"{stats.best_iou:.2f}); lower train.min_iou, or extract with a larger --topk or a detector "
            "that finds these objects"
        )
    if warn and stats.matched < FEW_MATCHED * stats.gt_instances:
        console.print(f"[bold yellow]warning:[/bold yellow] {where}: only {stats.line()} "
                      f"(fewer than {FEW_MATCHED:.0%}); the head learns from the matched ones alone",
                      highlight=False, soft_wrap=True)
    return stats


def load_run(run_dir: Path, cache: Cache, device: torch.device) -> tuple[MaskHead, RunConfig]:
    """The trained head of a run folder, checked against the cache it will read."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise MfcacheError(f"no trained head in {run_dir} (expected {CHECKPOINT}; run `mfcache train`)")
    state = load_checkpoint(path, what="run checkpoint", map_location=device)
    problem = fingerprint_mismatch(state["fingerprint"], cache.fingerprint)
    if problem:
        raise MfcacheError(f"the head in {run_dir} was trained on a cache made with {problem}")
    config = RunConfig.from_dict(state["config"])
    head = head_for(cache, config).to(device)
    head.load_state_dict(state["model"])
    return head.eval(), config


def mask_scores(class_scores: torch.Tensor, mask_prob: torch.Tensor, scoring: str,
                quality: torch.Tensor | None = None) -> torch.Tensor:
    """[N] class scores x (for ``mask_prob``) the mean probability of the pixels > 0.5 of
    each [N, M, M] mask (the paper's baseline rescoring), or x (for ``mask_iou``) the
    head's predicted mask quality ``[N]``."""
    if scoring == "class":
        return class_scores
    if scoring == "mask_iou":
        if quality is None:
            raise MfcacheError("scoring mask_iou needs a head with a quality branch (HeadOutput.quality)")
        return class_scores * quality
    fg = (mask_prob > 0.5).float()
    return class_scores * (mask_prob * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1.0)


def kept_queries(labels: torch.Tensor, to_category: torch.Tensor, max_detections: int) -> torch.Tensor:
    """``[B, K]`` bool: the detections evaluation reports, i.e. labels that map to a dataset
    category (``to_category [num labels]``, -1 = none), the first ``max_detections`` of each
    image in score order (the cache stores queries in score order)."""
    mapped = to_category.to(labels.device)[labels] >= 0
    return mapped & (mapped.cumsum(1) <= max_detections)


def mask_probs(head: MaskHead, batch: dict, select: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mask probabilities ``[B, K, M, M]`` inside each query's box for a collated batch
    (:func:`mfcache.cache.reader.collate`, on the head's device; without its ``level_hw`` and
    ``c1_hw``, every map counts as fully valid), and the head's predicted
    quality ``[B, K]`` (None if the head has no scoring branch). With ``select [B, K]`` only the
    selected detections get masks; the others are left at zero. The head runs once per query
    (:func:`first_detections`); a query's other detections share its mask."""
    b, k = batch["queries"].shape[:2]
    device = batch["queries"].device
    if select is None:
        select = torch.ones(b, k, dtype=torch.bool, device=device)
    first = first_detections(batch["query_index"], select)
    run = once_per_query(batch["query_index"], select)
    out = head(batch["queries"], batch["boxes"], batch["levels"], batch.get("c1"), run,
               level_hw=batch.get("level_hw"), c1_hw=batch.get("c1_hw"))
    m = out.mask_logits.shape[-1]
    prob = out.mask_logits.new_zeros(b, k, m, m)
    prob[run] = out.mask_logits.sigmoid()[:, 0]
    prob = prob.gather(1, first[..., None, None].expand(-1, -1, m, m)) * select[..., None, None]
    if out.quality is None:
        return prob, None
    quality = out.quality.new_zeros(b, k)
    quality[run] = out.quality.reshape(-1)
    return prob, quality.gather(1, first) * select


def image_results(batch: dict, b: int, prob: torch.Tensor, to_category: torch.Tensor, config: RunConfig,
                  box_filled: bool = False, quality: torch.Tensor | None = None) -> dict[str, list[dict]]:
    """COCO results of image ``b`` of a collated batch, whose mask probabilities are
    ``prob [K, M, M]``: the detections :func:`kept_queries` selects, boxes and masks in
    original pixels. ``{"head": [...]}`` and, with ``box_filled``, the same detections with each
    mask set to its whole box (scored by the class score). ``quality [K]``: the head's
    predicted mask quality, needed by ``mask_iou`` scoring."""
    image_id = batch["image_id"][b]
    labels = batch["labels"][b].cpu()
    category = to_category[labels]
    keep = torch.nonzero(kept_queries(labels[None], to_category, config.eval.max_detections)[0]).flatten()
    orig_hw = tuple(batch["orig_hw"][b].tolist())
    boxes = scale_boxes(batch["boxes"][b][keep], tuple(batch["input_hw"][b].tolist()), orig_hw)
    scores = mask_scores(batch["scores"][b][keep], prob[keep], config.head.scoring,
                         None if quality is None else quality[keep])
    masks = paste_masks(prob[keep], boxes, orig_hw, threshold=config.eval.mask_threshold)
    results = {"head": results_from_detections(image_id, boxes.cpu(), scores.cpu(), category[keep],
                                               encode_rle(masks.cpu()))}
    if box_filled:
        filled = paste_masks(torch.ones_like(prob[keep]), boxes, orig_hw, threshold=0.5)
        results["box_filled"] = results_from_detections(
            image_id, boxes.cpu(), batch["scores"][b][keep].cpu(), category[keep], encode_rle(filled.cpu()))
    return results


@torch.no_grad()
def predict_split(head: MaskHead, config: RunConfig, data: CacheSplit, device: torch.device,
                  progress: bool = True, box_filled: bool = False) -> dict[str, list[dict]]:
    """COCO results for every image of ``data``: ``{"head": [...]}`` and, with
    ``box_filled``, the same detections with each mask set to its whole box."""
    dataset = CacheDataset(data.cache.path, data.name, levels=head.levels, c1=head.uses_c1, targets=False)
    loader = DataLoader(dataset, batch_size=config.eval.batch_size, collate_fn=collate)
    to_category = torch.as_tensor(data.label_to_category)
    results: dict[str, list[dict]] = {"head": [], **({"box_filled": []} if box_filled else {})}
    with progress_bar(progress) as bar:
        task = bar.add_task(f"eval {data.name}", total=len(dataset), status="")
        for batch in loader:
            batch = _to(batch, device)
            prob, quality = mask_probs(head, batch, kept_queries(batch["labels"], to_category,
                                                                 config.eval.max_detections))
            for b in range(len(batch["image_id"])):
                q = None if quality is None else quality[b]
                for key, items in image_results(batch, b, prob[b], to_category, config, box_filled, q).items():
                    results[key] += items
            bar.advance(task, len(batch["image_id"]))
    return results


def evaluate(*, cache_path: Path, run_dir: Path, split: str | None = None, out: Path | None = None,
             box_filled: bool = True, progress: bool = True, device: str = "auto",
             on_results: Callable[[CacheSplit, list[dict]], None] | None = None) -> dict:
    """COCO segm + bbox AP of a trained head on a cache split; writes ``metrics.json``
    (default: inside the run folder) and returns the metrics. ``on_results(split, results)``,
    if given, receives the head's COCO results once the metrics are written (e.g. to draw them)."""
    out = Path(out) if out else Path(run_dir) / "metrics.json"
    check_file(out, "--out (the metrics file)")  # now, not after the whole evaluation
    cache = Cache(cache_path)
    data = cache.split(split, role="eval")
    data.require_complete()
    torch_device = resolve_device(device)
    head, config = load_run(Path(run_dir), cache, torch_device)
    results = predict_split(head, config, data, torch_device, progress=progress, box_filled=box_filled)
    coco_gt = data.coco()
    evaluated = data.index["image_id"][data.done].tolist()  # images skipped at extraction are not scored
    metrics = coco_evaluate(coco_gt, results["head"], image_ids=evaluated)
    if box_filled:
        metrics["box_filled"] = {"segm": coco_evaluate(coco_gt, results["box_filled"], iou_types=("segm",), image_ids=evaluated)["segm"]}
    metrics.update({
        "split": data.name, "num_images": len(evaluated), "skipped_images": sorted(data.skipped),
        "skipped_annotations": sorted(data.skipped_annotations),  # left out of the GT at extract
        "num_detections": len(results["head"]),
        "detector": {"spec": cache.detector.spec, "trained": cache.detector.trained},
        "config": config.to_dict(),
    })
    with write_errors("the metrics", out):
        out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(metrics, indent=2, default=_json_default)
        tmp = out.with_name(f".{out.name}.tmp")
        try:  # whole or not at all: a full disk leaves no truncated metrics.json
            tmp.write_text(text)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    if on_results is not None:
        with write_errors("the visualisations", out.parent):
            on_results(data, results["head"])
    return metrics


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value)}")

