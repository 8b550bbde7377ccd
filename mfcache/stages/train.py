"""Stage 2: train a mask head from a cache (the detector is never loaded).

A plain, visible loop: :class:`~mfcache.stages.sampling.StepBatches` decides each step's
images, the reader serves them as a :class:`~mfcache.cache.sample.Batch`, the head runs on
each query matched to a GT instance once, and :func:`~mfcache.ops.losses.head_loss` scores
it. The run folder is read and written by :mod:`mfcache.stages.runs`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mfcache.cache.reader import Cache, CacheDataset, CacheSplit, collate, raise_failures
from mfcache.cache.sample import Batch, on_device
from mfcache.cache.schema import DONE, fingerprint_mismatch
from mfcache.cache.stats import FEW_MATCHED, MatchStats, split_stats
from mfcache.config import RunConfig, resolve_run_config, resume_config
from mfcache.distributed import World, all_sum, close_world, init_world, together
from mfcache.errors import MfcacheError
from mfcache.heads import MaskHead
from mfcache.ops.losses import head_loss, image_generators
from mfcache.outputs import check_folder, write_errors
from mfcache.runtime import autocast, console, progress_bar, resolve_device
from mfcache.stages.categories import check_learnable, held_out, held_out_annotations, learned_mask
from mfcache.stages.postprocess import once_per_query, run_head
from mfcache.stages.runs import (
    CHECKPOINT,
    LOG,
    checkpoint_to_resume,
    head_for,
    save_best_checkpoint,
    save_run_checkpoint,
    write_run_info,
)
from mfcache.stages.sampling import RankSlice, lr_at, step_batches
from mfcache.stages.validation import PeriodicValidation
from mfcache.stages.watch import Scalars, require_tensorboard, settings_summary
from mfcache.stopping import Interrupted, StopSignals, ignore_stop_signals, worker_batches


def train(
    *,
    cache_path: Path,
    run_dir: Path,
    config: RunConfig | None = None,
    overrides: list[str] | None = None,
    split: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``config.head`` on a cache split; returns the final log entry, with ``seconds``
    and the ``head`` name (``finished``: the run was already at its last step).

    With ``resume`` the run continues from ``run_dir``'s checkpoint: with ``config`` None it
    takes the configuration stored there, with ``overrides`` (``--set`` strings) applied, and
    the split it was trained on; a changed configuration may only extend the schedule or change
    how the run runs (:func:`mfcache.config.resume_config`). Without ``resume``, ``config``
    None means the defaults with ``overrides``.

    SIGINT (Ctrl-C), SIGTERM or SIGUSR1 (a scheduler's early warning) stop the run after the
    step in progress, save a checkpoint there and raise :class:`mfcache.stopping.Interrupted`;
    resuming from it gives exactly the uninterrupted run. A signal to the whole process group
    (a cluster's preemption) is the same: the loader's workers ignore it and are ended here.

    Under ``torchrun --nproc_per_node N`` the head is wrapped in DistributedDataParallel and
    every rank takes a disjoint slice of each step's batch (the global batch stays
    ``train.batch_size``); each rank's loss is weighted by its share of the step's positives,
    so the averaged gradient equals a one-process run's. Only rank 0 writes the run folder.

    With ``progress`` the resolved settings are printed (stderr) before the first step. With
    ``train.eval_every`` N > 0 the head is validated (segm AP on the cache's val split) every N
    steps and at the end, and the best is kept as ``best.pt``
    (:mod:`mfcache.stages.validation`); ``train.tensorboard`` writes the log as TensorBoard
    scalars (:mod:`mfcache.stages.watch`). With ``train.categories`` the head learns from those
    categories' instances alone; queries on the others' are left out of the loss
    (:mod:`mfcache.stages.categories`)."""
    run_dir = Path(run_dir)
    check_folder(run_dir, "`train.run_dir` (the run folder)")  # a file or a read-only place: before any work
    state = checkpoint_to_resume(run_dir, resume)
    if state is not None:
        config = resume_config(
            RunConfig.from_dict(state["config"]),
            at_step=state["step"],
            run=run_dir,
            requested=config,
            overrides=overrides,
        )
        split = split or state.get("split")
    elif config is None:
        config = resolve_run_config(None, overrides)
    device = resolve_device(config.train.device)
    if config.train.tensorboard:
        require_tensorboard()  # before any work
    world, created = init_world(device)
    try:
        # under torchrun each setup step ends on all ranks together: a failure on any rank is the
        # same one-line error on all of them, none is left waiting (mfcache.distributed.together)
        with together(world):
            cache, data = _open_split(cache_path, split, state, run_dir)
            _check_positives(data, config.train.min_iou, warn=world.is_main)
            excluded, held = _held_out(data, config)
        trainer = Trainer(cache, data, config, world=world, device=world.device(device), state=state, excluded=excluded)
        with together(world):
            if world.is_main:
                write_run_info(run_dir, config, cache_path, data.name)
        if world.is_main and progress:
            console.print(
                settings_summary(
                    config,
                    cache=cache_path,
                    split=data.name,
                    images=len(data.complete_rows),
                    run_dir=run_dir,
                    device=trainer.device,
                    ranks=world.size,
                    step=trainer.step,
                    validation=trainer.validation.data.name if trainer.validation else None,
                    held_out=held,
                ),
                highlight=False,
                soft_wrap=True,
                markup=False,
            )
        return trainer.run(run_dir, progress=progress and world.is_main)
    finally:
        close_world(created)


def _open_split(cache_path: Path, split: str | None, state: dict | None, run_dir: Path) -> tuple[Cache, CacheSplit]:
    """The cache and its complete training split; a resumed run's must be the cache it began on."""
    cache = Cache(cache_path)
    data = cache.split(split, role="train")
    data.require_complete()
    if state is not None:
        problem = fingerprint_mismatch(state["fingerprint"], cache.fingerprint)
        if problem:
            raise MfcacheError(f"the run in {run_dir} was trained on a cache made with {problem}")
    return cache, data


def _check_positives(data: CacheSplit, min_iou: float, warn: bool) -> MatchStats:
    """Refuse a split on which no query would train (no GT instance is a cached query's best
    match at box IoU >= ``min_iou``); warn when fewer than :data:`FEW_MATCHED` of its GT
    instances are (the head learns from those alone, and eval counts the rest as misses)."""
    stats = split_stats(data.group, min_iou, data.cache.settings.views)
    where = f"split {data.name!r} of {data.cache.path}"
    if stats.gt_instances == 0:
        raise MfcacheError(
            f"{where} has no ground-truth instances to train on (its annotation file "
            f"{data.attrs.get('annotation_file')} lists none)"
        )
    if stats.matched == 0:
        raise MfcacheError(
            f"{where} has nothing to train on: none of its {stats.gt_instances} GT instances is the best match "
            f"of a cached query at box IoU >= train.min_iou={min_iou:g} (the best query-GT IoU is "
            f"{stats.best_iou:.2f}); lower `train.min_iou`, or extract with a larger `extract.topk` or a detector "
            "that finds these objects"
        )
    if warn and stats.matched < FEW_MATCHED * stats.gt_instances:
        console.print(
            f"[bold yellow]warning:[/bold yellow] {where}: only {stats.line()} "
            f"(fewer than {FEW_MATCHED:.0%}); the head learns from the matched ones alone",
            highlight=False,
            soft_wrap=True,
        )
    return stats


def _held_out(data: CacheSplit, config: RunConfig) -> tuple[torch.Tensor, list[str]]:
    """With ``train.categories``: the annotation ids ``[A]`` of the other categories' instances
    (left out of the loss) and those categories' names; checked against the split's categories,
    refused when no positive is left. Without: nothing excluded."""
    tc = config.train
    if not tc.categories:
        return torch.zeros(0, dtype=torch.int64), []
    coco = data.coco()
    where = f"split {data.name!r} of {data.cache.path}"
    held = held_out(coco, tc.categories, where)
    excluded = held_out_annotations(coco, held)
    if held:
        rows = np.flatnonzero(data.index["done"] == DONE)
        check_learnable(
            data.group["targets/gt_id"][:][rows],
            data.group["targets/gt_iou"][:][rows],
            excluded,
            tc.min_iou,
            where,
            tc.categories,
        )
    return excluded, held


class Trainer:
    """One training run of a head on a cache split: the head, its optimizer and step, and the
    data loader that serves step ``step`` onwards (``state``: the checkpoint to resume;
    ``excluded [A]``: annotation ids whose queries never train, ``train.categories``)."""

    def __init__(
        self,
        cache: Cache,
        data: CacheSplit,
        config: RunConfig,
        *,
        world: World,
        device: torch.device,
        state: dict | None = None,
        excluded: torch.Tensor | None = None,
    ):
        self.cache, self.data, self.config, self.world, self.device = cache, data, config, world, device
        self.excluded = (excluded if excluded is not None else torch.zeros(0, dtype=torch.int64)).to(device)
        tc = config.train
        torch.manual_seed(tc.seed)
        self.head: MaskHead = head_for(cache.detector, cache.settings, config.head).to(device)
        self.model = torch.nn.parallel.DistributedDataParallel(self.head) if world.enabled else self.head
        self.optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
        )
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
        self.step = 0
        self.best = state.get("best") if state is not None else None  # the record of best.pt
        # every rank opens the val split (a cache without one fails on all alike); rank 0 alone validates
        self.validation = PeriodicValidation.open(cache, tc.eval_every, self.best)
        if state is not None:
            self.head.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            self.step = state["step"]
            if "rng" in state:  # random ops after step s match an uninterrupted run's
                torch.set_rng_state(state["rng"])

    def loader(self) -> DataLoader:
        """Batches of steps ``self.step`` .. ``train.steps`` (this rank's slice of each)."""
        tc = self.config.train
        views = self.cache.settings.views  # extract --views: one view per image per epoch
        dataset = CacheDataset(
            self.cache.path,
            self.data.name,
            levels=self.head.levels,
            c1=self.head.uses_c1,
            targets=True,
            all_views=views > 1,
        )
        if len(dataset) == 0:
            raise MfcacheError(f"split {self.data.name!r} has no images to train on")
        batches = step_batches(len(dataset), tc.batch_size, tc.seed, self.step, tc.steps, views=views)
        return DataLoader(
            dataset,
            batch_sampler=RankSlice(batches, self.world) if self.world.enabled else batches,
            collate_fn=collate,
            num_workers=tc.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_stop_signals,
            # its own generator: starting the loader must not draw from the global RNG,
            # or a resumed run's random ops (point sampling) would be shifted by one draw
            generator=torch.Generator().manual_seed(tc.seed),
        )

    def run(self, run_dir: Path, progress: bool) -> dict:
        """Train to ``train.steps``, logging and checkpointing into ``run_dir``; returns the
        last log entry with ``seconds`` and ``head``. A stop signal ends it after a whole
        step, with a checkpoint there, by raising :class:`~mfcache.stopping.Interrupted`."""
        tc, checkpoint_path = self.config.train, run_dir / CHECKPOINT
        entry: dict = {"step": self.step}
        if self.step >= tc.steps:  # a finished run resumed without a longer schedule: nothing to do
            return {**entry, "finished": True, "seconds": 0.0, "head": self.config.head.name}
        loader = self.loader()
        self.head.train()
        started = time.perf_counter()
        with write_errors("the training log", run_dir / LOG):
            log = (run_dir / LOG).open("a") if self.world.is_main else open(os.devnull, "w")
        scalars = Scalars(run_dir, enabled=tc.tensorboard and self.world.is_main, step=self.step)
        with log, scalars, StopSignals() as stop, worker_batches(loader) as batches, progress_bar(progress) as bar:
            task = bar.add_task("train", total=tc.steps, completed=self.step, status="")
            for batch in on_device(raise_failures(batches), self.device):
                entry = self.train_step(batch, checkpoint_path)
                if self.validation is not None and self.validation.due(self.step, tc.steps):
                    self.validate(run_dir, entry, say=progress)
                if self.step % tc.log_every == 0 or self.step == tc.steps or "val" in entry:
                    with write_errors("the training log", run_dir / LOG):
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                    scalars.write(entry)
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                    self.checkpoint(run_dir)
                bar.update(
                    task, advance=1, status=f"loss {entry['loss']:.4f}" if entry["loss"] is not None else "no positives"
                )
                if stop.requested(self.device, self.world.enabled):  # after a whole step: resumes exactly
                    break
        if self.step < tc.steps or not checkpoint_path.exists():
            self.checkpoint(run_dir)
        if stop.signum is not None and self.step < tc.steps:
            raise Interrupted(stop.signum, f"at step {self.step} of {tc.steps}; checkpoint saved to {checkpoint_path}")
        return {**entry, "seconds": time.perf_counter() - started, "head": self.config.head.name}

    def train_step(self, batch: Batch, checkpoint_path: Path) -> dict:
        """One optimizer step on ``batch`` (on the device); returns its log entry. The head
        learns from each detection matched to a GT instance at ``train.min_iou`` (of a learned
        category: ``train.categories``), once per query; a step without any (on every rank)
        updates nothing."""
        tc, world = self.config.train, self.world
        lr = lr_at(self.step, tc.steps, tc.lr, tc.lr_drops)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        select = once_per_query(
            batch.query_index,
            (batch.gt_id >= 0) & (batch.gt_iou >= tc.min_iou) & learned_mask(batch.gt_id, self.excluded),
        )
        self.step += 1
        local = int(select.sum())
        positives = int(all_sum(local, self.device))  # over every rank's slice of the batch
        if not positives:  # no query overlaps a GT well enough: nothing to learn from this batch
            return {"step": self.step, "loss": None, "positives": 0, "lr": lr}
        if not local:  # run one query at weight 0, so every rank's DDP reduces the same graph
            select = select.clone()
            select.view(-1)[0] = True
        generators = (
            image_generators(select.sum(1).tolist(), batch.image_id, seed=tc.seed, step=self.step, device=self.device)
            if self.config.head.loss == "point"
            else None
        )
        with autocast(self.device, tc.amp):  # the head's forward; its loss in float32
            out = run_head(self.model, batch, select).float()
        loss, parts = head_loss(out, batch.target_masks[select], self.config.head, tc, generators)
        if world.enabled:  # the step's losses over the whole batch, as a one-process run logs them
            value = all_sum(loss.item() * local, self.device) / positives
            parts = {k: torch.tensor(all_sum(v.item() * local, self.device) / positives) for k, v in parts.items()}
        else:
            value = loss.item()
        if not math.isfinite(value):
            raise MfcacheError(_non_finite(value, self.step, checkpoint_path))
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages over ranks: weighting by the rank's share of positives gives the global mean
        self.scaler.scale(loss * (local * world.size / positives) if world.enabled else loss).backward()
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) if fp16 gradients overflowed
        self.scaler.update()
        return {
            "step": self.step,
            "loss": value,
            **{k: v.item() for k, v in parts.items()},
            "positives": positives,
            "lr": lr,
        }

    def validate(self, run_dir: Path, entry: dict, say: bool) -> None:
        """Rank 0: this step's val segm AP into ``entry["val"]`` and, when it is the best so
        far, ``best.pt``; the other ranks wait for it (they hold the same weights)."""
        if self.world.is_main:
            entry["val"] = record = self.validation(self.head, self.config, self.device, self.step)
            if record.get("best"):
                self.best = self.validation.best
                save_best_checkpoint(
                    run_dir,
                    head=self.head,
                    config=self.config,
                    step=self.step,
                    fingerprint=self.cache.fingerprint,
                    split=self.data.name,
                    best=self.best,
                )
            if say:
                ap = record["segm"]["AP"]
                console.print(
                    f"step {self.step}: val segm AP {'-' if ap is None else f'{100 * ap:.1f}%'} on "
                    f"{record['split']!r}"
                    + (
                        " (best so far: best.pt)"
                        if record.get("best")
                        else f" (best {100 * self.best['segm_AP']:.1f}% at step {self.best['step']})"
                    ),
                    highlight=False,
                    soft_wrap=True,
                    markup=False,
                )
        self.world.barrier()

    def checkpoint(self, run_dir: Path) -> None:
        """Save the run at the current step (rank 0 only), with the record of ``best.pt``."""
        if self.world.is_main:
            save_run_checkpoint(
                run_dir,
                head=self.head,
                optimizer=self.optimizer,
                config=self.config,
                step=self.step,
                fingerprint=self.cache.fingerprint,
                split=self.data.name,
                scaler=self.scaler,
                best=self.best,
            )


def _non_finite(value: float, step: int, checkpoint_path: Path) -> str:
    if checkpoint_path.exists():
        return (
            f"loss became non-finite ({value}) at step {step}; nothing was updated, the last good checkpoint "
            f"is {checkpoint_path}: lower `train.lr` or set `train.grad_clip` and `train.resume`"
        )
    return (
        f"loss became non-finite ({value}) at step {step}, before the first checkpoint: lower `train.lr` or "
        "set `train.grad_clip`"
    )
