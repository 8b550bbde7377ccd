"""Train the demo detector (:func:`mfcache.detectors.demo.build_demo_model`) on a shapes
data set written by :func:`mfcache.data.shapes.write_shapes_dataset`.

    python -m mfcache.demo_detector.train --data DIR --out OUT --minutes 60 [--resume]

``DIR`` holds ``annotations/{train,val}.json`` and ``{train,val}/*.png``. ``OUT`` gets
``checkpoint.pt`` (model, optimizer, step, RNG states, config; written with
:func:`mfcache.checkpoint_io.save_checkpoint`, atomically, every ``--checkpoint-minutes``),
``log.jsonl`` (one JSON object per evaluation or checkpoint) and ``export/`` (the best model
so far by val bbox AP: ``save_pretrained`` files plus ``shapes_generator.json`` and
``training.json``), which is what ships as ``mfcache/detectors/demo_weights/``.

Conventions: training targets are transformers' ``labels`` — per image ``class_labels [G]``
(index into the model's ``id2label``) and ``boxes [G, 4]`` normalised cxcywh relative to
the unpadded input image (crowd annotations left out; :mod:`mfcache.demo_detector.data`).
Batch ``s`` of a run, its images and their horizontal flips, is a pure function of
``(seed, s)`` (:class:`~mfcache.demo_detector.data.FlipStepBatches`), so ``--resume``
continues exactly where an uninterrupted run would be (bit-exact on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mfcache.checkpoint_io import load_checkpoint, save_checkpoint
from mfcache.data.shapes import GENERATOR_VERSION
from mfcache.demo_detector.data import (
    UNBOUNDED,
    FlipStepBatches,
    ShapesTrainSet,
    category_to_label,
    detector_collate,
    read_split,
    read_targets,
    worker_init,
)
from mfcache.demo_detector.evaluate import evaluate_bbox
from mfcache.demo_detector.model import export_model, trainable_demo_model
from mfcache.detectors.base import Preprocess
from mfcache.detectors.demo import DEMO_PREPROCESS
from mfcache.errors import MfcacheError
from mfcache.outputs import write_errors
from mfcache.runtime import console, progress_bar, resolve_device
from mfcache.stages.runs import CHECKPOINT, LOG  # the head trainer's run folder names: the same files here

EXPORT = "export"


@dataclass(frozen=True)
class DetectorTrainConfig:
    """One training run. ``minutes`` / ``epochs`` / ``max_steps`` stop it (whichever comes
    first; ``minutes`` counts this invocation only). The fields in :data:`RUN_DEFINING`
    must match the checkpoint when resuming; the rest may change between invocations
    (``lr_drop_step`` included: set it when resuming once val AP has levelled off)."""

    data: str
    out: str
    minutes: float | None = None
    epochs: int | None = None
    max_steps: int | None = None
    device: str = "auto"
    batch_size: int = 8
    lr: float = 4e-4
    backbone_lr_scale: float = 1.0  # the backbone starts from random weights too
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    warmup_steps: int = 300
    lr_drop_step: int | None = None  # from this step on the learning rate is 10x lower
    backbone_init: str | None = None  # backbone.pt of mfcache.demo_detector.pretrain
    seed: int = 0
    shortest_edge: int = DEMO_PREPROCESS.shortest_edge  # input resize rule (written to the export)
    longest_edge: int = DEMO_PREPROCESS.longest_edge
    workers: int = 2
    checkpoint_minutes: float = 5.0
    eval_batch_size: int = 8
    progress: bool = True

    @property
    def preprocess(self) -> Preprocess:
        return replace(DEMO_PREPROCESS, shortest_edge=self.shortest_edge, longest_edge=self.longest_edge)


RUN_DEFINING = (
    "batch_size",
    "lr",
    "backbone_lr_scale",
    "weight_decay",
    "grad_clip",
    "warmup_steps",
    "seed",
    "shortest_edge",
    "longest_edge",
    "backbone_init",
)


def lr_factor(step: int, warmup_steps: int, drop_step: int | None = None) -> float:
    """Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps, then
    1, then 0.1 from ``drop_step`` on."""
    if drop_step is not None and step >= drop_step:
        return 0.1
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def last_step(config: DetectorTrainConfig, per_epoch: int) -> int:
    """The step ``max_steps`` / ``epochs`` stop the run at (:data:`UNBOUNDED`: the clock alone)."""
    stop = config.max_steps if config.max_steps is not None else math.inf
    if config.epochs is not None:
        stop = min(stop, config.epochs * per_epoch)
    return int(min(stop, UNBOUNDED))


def make_optimizer(model: nn.Module, config: DetectorTrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: the backbone at ``lr * backbone_lr_scale``, the rest at ``lr``."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        (backbone if ".backbone." in f".{name}" else rest).append(p)
    return torch.optim.AdamW(
        [
            {"params": rest, "lr": config.lr, "base_lr": config.lr},
            {
                "params": backbone,
                "lr": config.lr * config.backbone_lr_scale,
                "base_lr": config.lr * config.backbone_lr_scale,
            },
        ],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )


# --------------------------------------------------------------------------- persistence
def _rng_states() -> dict:
    """Every generator's state as tensors, numbers and tuples, so the checkpoint loads with
    the weights-only unpickler (numpy's key array travels as an int64 tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    keys = keys.numpy() if isinstance(keys, Tensor) else keys  # checkpoints saved before the change: an array
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_resume_state(config: DetectorTrainConfig, generator: dict, resume: bool) -> dict | None:
    """The checkpoint in ``config.out`` to continue (``resume``), checked to be the same run
    (:data:`RUN_DEFINING`, the same data set); None for a new run, whose ``out`` must hold none."""
    path = Path(config.out) / CHECKPOINT
    if not resume:
        if path.exists():
            raise MfcacheError(f"{path} exists; pass --resume to continue it or choose another --out")
        return None
    if not path.is_file():
        raise MfcacheError(f"--resume: no checkpoint at {path}")
    state = load_checkpoint(path, what="demo training checkpoint")
    for name in RUN_DEFINING:
        if state["config"][name] != getattr(config, name):
            raise MfcacheError(
                f"--resume: {name}={getattr(config, name)!r} differs from the checkpoint's "
                f"{state['config'][name]!r}; leave it as it was or start a new --out"
            )
    if state["generator"] != generator:
        raise MfcacheError(
            f"--resume: {config.data} is not the data set the checkpoint was trained on "
            f"({state['generator']} vs {generator})"
        )
    return state


def initial_model(config: DetectorTrainConfig, device: torch.device, *, new_run: bool) -> nn.Module:
    """:func:`trainable_demo_model` on ``device``; a new run's backbone comes from
    ``config.backbone_init`` when given (a resumed run's weights come from its checkpoint)."""
    model = trainable_demo_model(config.seed)
    if config.backbone_init is not None and new_run:
        weights = load_checkpoint(config.backbone_init, what="--backbone-init")
        try:
            model.model.backbone.model.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise MfcacheError(
                f"--backbone-init {config.backbone_init}: not a backbone.pt written by "
                f"mfcache.demo_detector.pretrain ({type(exc).__name__})"
            ) from None
    return model.to(device)


# --------------------------------------------------------------------------- the run
class DetectorTrainer:
    """One run of the demo detector: the model, its optimizer, where the run stands (``step``,
    best val AP so far, ...) and its folder ``config.out``. :meth:`run` trains until the
    config stops it; :meth:`train_step`, :meth:`evaluate`, :meth:`export` and
    :meth:`checkpoint` are its parts. ``resume``: continue the checkpoint in ``config.out``."""

    def __init__(self, config: DetectorTrainConfig, *, resume: bool = False):
        if config.minutes is None and config.epochs is None and config.max_steps is None:
            raise MfcacheError("say how long to train: --minutes N or --epochs N")
        self.config, self.out = config, Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(config.device)
        self.train_coco, self.val_coco = read_split(Path(config.data), "train"), read_split(Path(config.data), "val")
        self.generator = {
            "generator_version": GENERATOR_VERSION,
            "seed": int(self.train_coco.data["info"]["seed"]),
            "num_train": len(self.train_coco),
        }
        state = read_resume_state(config, self.generator, resume)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.model = initial_model(config, self.device, new_run=state is None)
        self.optimizer = make_optimizer(self.model, config)
        self.step, self.best_ap, self.last_metrics, self.evaluated_at, self.seconds_before = 0, -1.0, None, -1, 0.0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.best_ap, self.last_metrics = state["step"], state["best_ap"], state["last_metrics"]
            self.evaluated_at, self.seconds_before = state["evaluated_at"], state["seconds"]
            _set_rng_states(state["rng"])
        to_label = category_to_label(self.train_coco, self.model.config.id2label)
        self.dataset = ShapesTrainSet(self.train_coco, read_targets(self.train_coco, to_label), config.preprocess)
        self.batch_size = min(config.batch_size, len(self.dataset))
        self.per_epoch = len(self.dataset) // self.batch_size
        self.stop = last_step(config, self.per_epoch)
        # this invocation: its start, time in optimiser steps, images seen, losses since the last checkpoint
        self.started, self.train_s, self.images, self.losses = time.perf_counter(), 0.0, 0, []

    def loader(self) -> DataLoader:
        """The batches of steps ``step`` .. ``stop``: :class:`FlipStepBatches` keys, loaded."""
        config = self.config
        sampler = FlipStepBatches(len(self.dataset), self.batch_size, config.seed, self.step, self.stop)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=detector_collate,
            num_workers=config.workers,
            worker_init_fn=worker_init if config.workers else None,
            # its own generator: making an iterator must not draw from the global RNG
            # (dropout's), or a resumed run would drift from an uninterrupted one
            generator=torch.Generator().manual_seed(config.seed),
        )

    def run(self) -> dict:
        """Train from ``step`` until ``max_steps`` / ``epochs`` / ``minutes`` stop it, evaluating
        at the end of every epoch and of the invocation, checkpointing every
        ``checkpoint_minutes`` and at the end; returns ``{"step", "epoch", "best_ap", "last_metrics"}``."""
        config = self.config
        self.model.train()
        loader = self.loader()
        self.started = last_checkpoint = time.perf_counter()
        deadline = self.started + config.minutes * 60 if config.minutes is not None else math.inf
        with progress_bar(config.progress) as bar:
            task = bar.add_task(
                "train demo", total=None if self.stop == UNBOUNDED else self.stop, completed=self.step, status=""
            )
            for batch in loader:
                t0 = time.perf_counter()
                self.losses.append(self.train_step(batch))
                now = time.perf_counter()
                self.train_s += now - t0
                self.images += len(batch["labels"])
                bar.update(
                    task,
                    completed=self.step,
                    status=f"ep {self.step / self.per_epoch:.2f} loss "
                    f"{self.losses[-1]:.3f} {self.images / max(now - self.started, 1e-9):.1f} img/s",
                )
                if self.step % self.per_epoch == 0:
                    self.evaluate(partial=False)
                if time.perf_counter() >= deadline:
                    break  # the final checkpoint below
                if time.perf_counter() - last_checkpoint >= config.checkpoint_minutes * 60:
                    self.checkpoint()
                    last_checkpoint = time.perf_counter()
        if self.evaluated_at != self.step:
            self.evaluate(partial=self.step % self.per_epoch != 0)
        self.checkpoint()
        return {
            "step": self.step,
            "epoch": self.step / self.per_epoch,
            "best_ap": self.best_ap,
            "last_metrics": self.last_metrics,
        }

    def train_step(self, batch: dict) -> float:
        """One optimiser step on ``batch`` (:func:`detector_collate`'s); returns the loss. A
        non-finite loss stops the run."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(self.step, config.warmup_steps, config.lr_drop_step)
        labels = [{k: v.to(self.device) for k, v in t.items()} for t in batch["labels"]]
        loss = self.model(
            pixel_values=batch["pixel_values"].to(self.device),
            pixel_mask=batch["pixel_mask"].to(self.device, torch.long),
            labels=labels,
        ).loss
        if not torch.isfinite(loss):
            raise MfcacheError(f"training diverged: loss {loss.item()} at step {self.step}; try a lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def evaluate(self, partial: bool) -> dict:
        """Val bbox AP at this step (``partial``: not at an epoch's end), logged; the model is
        exported when it is the best so far. Returns the metrics."""
        self.evaluated_at = self.step
        t0 = time.perf_counter()
        metrics = evaluate_bbox(
            self.model, self.val_coco, self.device, self.config.eval_batch_size, self.config.preprocess
        )
        self.model.train()
        self.last_metrics = metrics
        record = {
            "event": "eval",
            "step": self.step,
            "epoch": self.step / self.per_epoch,
            "partial": partial,
            "eval_s": round(time.perf_counter() - t0, 1),
            "bbox": metrics,
        }
        if metrics["AP"] is not None and metrics["AP"] > self.best_ap:
            self.best_ap = metrics["AP"]
            record["best"] = True
            self.export(metrics)
        self.log(record)
        console.print(
            f"step {self.step} (epoch {self.step / self.per_epoch:.2f}): bbox AP {metrics['AP']:.3f} "
            f"AP50 {metrics['AP50']:.3f}" + (" (best)" if record.get("best") else "")
        )
        return metrics

    def export(self, metrics: dict) -> None:
        """``OUT/export``: the model now, with ``training.json`` saying how it was trained and
        its val bbox ``metrics``."""
        training = {
            "step": self.step,
            "epoch": self.step / self.per_epoch,
            "images_seen": self.step * self.batch_size,
            "hours": self.total_seconds() / 3600,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "val_bbox": metrics,
            "val_images": len(self.val_coco),
            "config": asdict(self.config),
        }
        export_model(self.model, self.out / EXPORT, self.generator, self.config.preprocess, training)

    def checkpoint(self) -> None:
        """Log a ``checkpoint`` record (mean loss since the last one, throughput), then save
        ``OUT/checkpoint.pt``. ``images_per_s``: wall clock of this invocation, evaluation
        included; ``step_images_per_s``: forward + backward + optimiser step alone."""
        elapsed = time.perf_counter() - self.started
        self.log(
            {
                "event": "checkpoint",
                "step": self.step,
                "epoch": self.step / self.per_epoch,
                "train_loss": float(np.mean(self.losses)) if self.losses else None,
                "images_per_s": self.images / max(elapsed, 1e-9),
                "step_images_per_s": self.images / max(self.train_s, 1e-9),
                "elapsed_s": round(elapsed, 1),
            }
        )
        self.losses.clear()
        save_checkpoint(
            self.out / CHECKPOINT,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "epoch": self.step // self.per_epoch,
                "best_ap": self.best_ap,
                "last_metrics": self.last_metrics,
                "evaluated_at": self.evaluated_at,
                "seconds": self.total_seconds(),
                "rng": _rng_states(),
                "config": asdict(self.config),
                "generator": self.generator,
            },
            what="the demo training checkpoint",
        )

    def total_seconds(self) -> float:
        """Wall time of every invocation of this run so far."""
        return self.seconds_before + time.perf_counter() - self.started

    def log(self, record: dict) -> None:
        """Append ``record`` to ``OUT/log.jsonl``."""
        with write_errors("the training log", self.out / LOG), open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def train_detector(config: DetectorTrainConfig, *, resume: bool = False) -> dict:
    """Train (or ``resume``) the demo detector; returns the final state summary
    ``{"step", "epoch", "best_ap", "last_metrics"}``."""
    return DetectorTrainer(config, resume=resume).run()


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[DetectorTrainConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m mfcache.demo_detector.train",
        description="Train the demo detector on a shapes data set. Example: python -m "
        "mfcache.demo_detector.train --data /tmp/shapes --out /tmp/demo-run --minutes 60",
    )
    defaults = DetectorTrainConfig(data="", out="")
    parser.add_argument("--data", required=True, help="shapes data set folder (annotations/, train/, val/)")
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, export/")
    parser.add_argument("--minutes", type=float, help="stop after this many minutes (this invocation)")
    parser.add_argument("--epochs", type=int, help="stop after this many epochs (in all)")
    parser.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    for f in fields(DetectorTrainConfig):
        if f.name in ("data", "out", "minutes", "epochs", "progress"):
            continue
        optional = {"max_steps": int, "lr_drop_step": int, "backbone_init": str}  # default None: no type to copy
        kind = optional.get(f.name, type(getattr(defaults, f.name)))
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(DetectorTrainConfig) if f.name != "progress"}
    return replace(DetectorTrainConfig(**values), progress=not args.no_progress), args.resume


def main(argv: list[str] | None = None) -> int:
    config, resume = parse_args(argv)
    try:
        summary = train_detector(config, resume=resume)
    except MfcacheError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    console.print(
        f"done: step {summary['step']}, best bbox AP {summary['best_ap']:.3f}, export in {Path(config.out) / EXPORT}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
