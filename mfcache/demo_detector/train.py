"""Train the demo detector (:func:`mfcache.detectors.demo.build_demo_model`) on a shapes
data set written by :func:`mfcache.data.shapes.write_shapes_dataset`.

    python -m mfcache.demo_detector.train --data DIR --out OUT --minutes 60 [--resume]

``DIR`` holds ``annotations/{train,val}.json`` and ``{train,val}/*.png``. ``OUT`` gets
``checkpoint.pt`` (model, optimizer, step, RNG states, config; written atomically every
``--checkpoint-minutes``), ``log.jsonl`` (one JSON object per evaluation or checkpoint) and
``export/`` (the best model so far by val bbox AP: ``save_pretrained`` files plus
``shapes_generator.json`` and ``training.json``), which is what ships as ``mfcache/detectors/demo_weights/``.

Conventions: training targets are transformers' ``labels`` — per image ``class_labels [G]``
(index into the model's ``id2label``) and ``boxes [G, 4]`` normalised cxcywh relative to
the unpadded input image (crowd annotations left out). Batch ``s`` of a run, its images and
their horizontal flips, is a pure function of ``(seed, s)``, so ``--resume`` continues
exactly where an uninterrupted run would be (bit-exact on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mfcache.checkpoint_io import load_checkpoint
from mfcache.data.coco import CocoDataset
from mfcache.data.shapes import GENERATOR_VERSION
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.detectors.base import DetectorOutput, Preprocess, select_topk
from mfcache.detectors.demo import DEMO_PREPROCESS, GENERATOR_FILE, TRAINING_FILE, build_demo_model
from mfcache.errors import MfcacheError
from mfcache.metrics import coco_evaluate, results_from_detections
from mfcache.runtime import console, progress_bar, resolve_device

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
EXPORT = "export"
TOPK = 100  # detections per image kept for evaluation, as transformers' post-processing does
UNBOUNDED = 2**62  # step count of a run stopped by the clock alone


@dataclass(frozen=True)
class TrainConfig:
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


RUN_DEFINING = ("batch_size", "lr", "backbone_lr_scale", "weight_decay", "grad_clip", "warmup_steps", "seed",
                "shortest_edge", "longest_edge", "backbone_init")


def lr_factor(step: int, warmup_steps: int, drop_step: int | None = None) -> float:
    """Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps, then
    1, then 0.1 from ``drop_step`` on."""
    if drop_step is not None and step >= drop_step:
        return 0.1
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Targets:
    """One image's training targets: ``boxes [G, 4]`` xyxy original pixels, ``labels [G]``
    model label indices; crowd annotations already removed."""

    boxes: Tensor
    labels: Tensor


def read_split(data: Path, split: str) -> CocoDataset:
    """``DIR/annotations/{split}.json`` + ``DIR/{split}/``, checked to come from the current
    shapes generator (its ``info.generator_version``)."""
    coco = CocoDataset(data / "annotations" / f"{split}.json", data / split)
    version = coco.data.get("info", {}).get("generator_version")
    if version != GENERATOR_VERSION:
        raise MfcacheError(f"{coco.annotation_file}: shapes generator version {version!r}, but this mfcache "
                           f"generates version {GENERATOR_VERSION!r}; rewrite the data set")
    return coco


def category_to_label(coco: CocoDataset, id2label: dict[int, str]) -> dict[int, int]:
    """COCO category id -> model label index, matched by category name."""
    index = {name: int(i) for i, name in id2label.items()}
    missing = [name for name in coco.category_names.values() if name not in index]
    if missing:
        raise MfcacheError(f"{coco.annotation_file}: category {missing[0]!r} is not one of the model's "
                           f"labels {sorted(index)}")
    return {cid: index[name] for cid, name in coco.category_names.items()}


def read_targets(coco: CocoDataset, to_label: dict[int, int]) -> list[Targets]:
    """Targets of every image of ``coco``, in ``coco.images`` order."""
    lookup = torch.full((max(to_label) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(list(to_label))] = torch.tensor(list(to_label.values()))
    out = []
    for image in coco.images:
        gt = coco.ground_truth(image)
        keep = ~gt.iscrowd
        out.append(Targets(boxes=gt.boxes[keep], labels=lookup[gt.category_ids[keep]]))
    return out


class ShapesTrainSet(Dataset):
    """Item ``(i, flip)`` -> ``(input [3, h, w], class_labels [G], boxes [G, 4] cxcywh in
    [0, 1] of the input)``, the image and boxes mirrored left-right when ``flip``."""

    def __init__(self, coco: CocoDataset, targets: list[Targets], preprocess: Preprocess = DEMO_PREPROCESS):
        self.coco, self.targets, self.preprocess = coco, targets, preprocess

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Tensor, Tensor, Tensor]:
        index, flip = key
        image = self.coco.images[index]
        x = to_input(load_image(self.coco.image_path(image)), self.preprocess)
        t = self.targets[index]
        scale = t.boxes.new_tensor([image.width, image.height, image.width, image.height])
        x0, y0, x1, y1 = (t.boxes / scale).clamp(0, 1).unbind(-1)
        if flip:
            x, x0, x1 = x.flip(-1), 1 - x1, 1 - x0
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        return x, t.labels, boxes


def collate_train(items: list[tuple[Tensor, Tensor, Tensor]]) -> dict:
    pixel_values, pixel_mask = pad_batch([x for x, _, _ in items], DEMO_PREPROCESS)
    labels = [{"class_labels": c, "boxes": b} for _, c, b in items]
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}


class StepBatches(Sampler):
    """Batch ``s`` is a pure function of ``(seed, s)``: each epoch a fresh permutation (last
    partial batch dropped) and a fresh coin per image for the horizontal flip."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.bs, self.seed, self.start, self.stop = num_items, min(batch_size, num_items), seed, start, stop
        self.per_epoch = self.n // self.bs

    def batch(self, step: int) -> list[tuple[int, bool]]:
        epoch, pos = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        flips = torch.rand(self.n, generator=g) < 0.5
        chosen = perm[pos * self.bs:(pos + 1) * self.bs]
        return list(zip(chosen.tolist(), flips[chosen].tolist()))

    def __iter__(self):
        return (self.batch(s) for s in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the main process needs the cores for the model


# --------------------------------------------------------------------------- model
def trainable_demo_model(seed: int) -> nn.Module:
    """:func:`build_demo_model` set up for training: every parameter trainable (transformers
    freezes the built-in ResNet backbone: it unfreezes ``stage.N`` names, the ResNet calls
    them ``stages.N``), the backbone's frozen batch norms made trainable again (see
    :func:`unfreeze_batch_norm`) and one loss per decoder layer (``auxiliary_loss``; no
    new weights)."""
    model = build_demo_model(seed)
    model.config.auxiliary_loss = True
    unfreeze_batch_norm(model)
    model.requires_grad_(True)
    return model


def unfreeze_batch_norm(module: nn.Module) -> None:
    """Swap every frozen batch norm under ``module`` for a trainable ``nn.BatchNorm2d`` with
    the same affine and running statistics, in place. transformers freezes them for
    pretrained backbones; a backbone trained from scratch with frozen (identity) norms has
    no normalisation at all and learns far more slowly. :func:`frozen_copy` swaps back."""
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrFrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, DeformableDetrFrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.weight.numel())
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, key).copy_(getattr(child, key))
            module._modules[name] = norm.to(child.weight.device)
        else:
            unfreeze_batch_norm(child)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of the training model with its batch norms frozen again (statistics and
    affine kept): the architecture :func:`build_demo_model` makes and ``from_pretrained``
    loads, equal to ``model`` in eval mode."""
    from transformers.models.deformable_detr.modeling_deformable_detr import replace_batch_norm

    frozen = copy.deepcopy(model).eval()
    replace_batch_norm(frozen)
    return frozen


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: the backbone at ``lr * backbone_lr_scale``, the rest at ``lr``."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        (backbone if ".backbone." in f".{name}" else rest).append(p)
    return torch.optim.AdamW(
        [{"params": rest, "lr": config.lr, "base_lr": config.lr},
         {"params": backbone, "lr": config.lr * config.backbone_lr_scale,
          "base_lr": config.lr * config.backbone_lr_scale}],
        lr=config.lr, weight_decay=config.weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, step: int,
               config: TrainConfig, device: torch.device) -> float:
    """One optimiser step on one batch; returns the loss. A non-finite loss stops the run."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, config.warmup_steps, config.lr_drop_step)
    labels = [{k: v.to(device) for k, v in t.items()} for t in batch["labels"]]
    out = model(pixel_values=batch["pixel_values"].to(device),
                pixel_mask=batch["pixel_mask"].to(device, torch.long), labels=labels)
    loss = out.loss
    if not torch.isfinite(loss):
        raise MfcacheError(f"training diverged: loss {loss.item()} at step {step}; try a lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_bbox(model: nn.Module, coco: CocoDataset, device: torch.device, batch_size: int = 8,
                  preprocess: Preprocess = DEMO_PREPROCESS) -> dict:
    """bbox COCO AP of ``model`` on every image of ``coco`` (top-100 (query, class) pairs
    per image, as transformers' post-processing ranks them). Leaves the model in eval mode."""
    model.eval()
    label_to_category = {}
    for cid, name in coco.category_names.items():
        label_to_category[int(model.config.label2id[name])] = cid
    to_category = torch.tensor([label_to_category.get(i, -1) for i in range(model.config.num_labels)])
    results = []
    for start in range(0, len(coco), batch_size):
        images = coco.images[start:start + batch_size]
        inputs = [to_input(load_image(coco.image_path(im)), preprocess) for im in images]
        pixel_values, pixel_mask = pad_batch(inputs, preprocess)
        raw = model(pixel_values=pixel_values.to(device), pixel_mask=pixel_mask.to(device, torch.long))
        # pred_boxes: cxcywh in [0, 1] of each unpadded input -> xyxy original pixels
        wh = torch.tensor([[im.width, im.height] for im in images], dtype=torch.float32, device=device)
        cx, cy, w, h = raw.pred_boxes.float().unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * wh.repeat(1, 2)[:, None]
        top = select_topk(DetectorOutput(queries=raw.last_hidden_state, logits=raw.logits, boxes=xyxy,
                                         memory=raw.encoder_last_hidden_state,
                                         spatial_shapes=torch.zeros(0, 2, dtype=torch.long),
                                         valid=torch.zeros(len(images), 0, 2, dtype=torch.long)),
                          TOPK, sigmoid=True)
        categories = to_category[top.labels.cpu()]
        for b, im in enumerate(images):
            keep = categories[b] >= 0
            results += results_from_detections(im.id, top.boxes[b].cpu()[keep], top.scores[b].cpu()[keep],
                                               categories[b][keep], None)
    return coco_evaluate(coco.coco, results, iou_types=("bbox",))["bbox"]


# --------------------------------------------------------------------------- persistence
def _rng_states() -> dict:
    """Every generator's state as tensors, numbers and tuples, so the checkpoint loads with
    the weights-only unpickler (numpy's key array travels as an int64 tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    keys = keys.numpy() if isinstance(keys, Tensor) else keys  # checkpoints saved before the change: an array
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` to a temporary file, then an atomic rename: a kill mid-save leaves
    the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def preprocessor_config(preprocess: Preprocess) -> dict:
    """A transformers ``preprocessor_config.json`` for DETR-style resizing (what
    :func:`mfcache.detectors.hf.read_preprocess` reads back)."""
    config = {"image_processor_type": "DeformableDetrImageProcessor", "do_resize": True,
              "size": {"shortest_edge": preprocess.shortest_edge, "longest_edge": preprocess.longest_edge},
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(preprocess.mean), "image_std": list(preprocess.std), "do_pad": True}
    if preprocess.pad_size is not None:
        config["pad_size"] = {"height": preprocess.pad_size[0], "width": preprocess.pad_size[1]}
    return config


def export_model(model: nn.Module, out: Path, generator: dict, preprocess: Preprocess,
                 training: dict | None = None) -> None:
    """``save_pretrained(out)`` + ``preprocessor_config.json`` + ``shapes_generator.json``
    (+ ``training.json``: how the weights were trained and their val bbox AP), replacing
    ``out`` whole."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    frozen_copy(model).save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(preprocess), indent=2) + "\n")
    (tmp / GENERATOR_FILE).write_text(json.dumps(generator, indent=2) + "\n")
    if training is not None:
        (tmp / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, resume: bool = False) -> dict:
    """Train (or resume) the demo detector; returns the final state summary
    ``{"step", "epoch", "best_ap", "last_metrics"}``."""
    if config.minutes is None and config.epochs is None and config.max_steps is None:
        raise MfcacheError("say how long to train: --minutes N or --epochs N")
    data, out = Path(config.data), Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    train_coco, val_coco = read_split(data, "train"), read_split(data, "val")
    info = train_coco.data["info"]
    generator = {"generator_version": GENERATOR_VERSION, "seed": int(info["seed"]), "num_train": len(train_coco)}

    ckpt_path = out / CHECKPOINT
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise MfcacheError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path, what="demo training checkpoint")
        for name in RUN_DEFINING:
            if state["config"][name] != getattr(config, name):
                raise MfcacheError(f"--resume: {name}={getattr(config, name)!r} differs from the checkpoint's "
                                   f"{state['config'][name]!r}; leave it as it was or start a new --out")
        if state["generator"] != generator:
            raise MfcacheError(f"--resume: {data} is not the data set the checkpoint was trained on "
                               f"({state['generator']} vs {generator})")
    elif ckpt_path.exists():
        raise MfcacheError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = trainable_demo_model(config.seed)
    if config.backbone_init is not None and state is None:
        weights = load_checkpoint(config.backbone_init, what="--backbone-init")
        try:
            model.model.backbone.model.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise MfcacheError(f"--backbone-init {config.backbone_init}: not a backbone.pt written by "
                               f"mfcache.demo_detector.pretrain ({type(exc).__name__})") from None
    model = model.to(device)
    optimizer = make_optimizer(model, config)
    step, best_ap, last_metrics, evaluated_at, seconds_before = 0, -1.0, None, -1, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_ap, last_metrics = state["step"], state["best_ap"], state["last_metrics"]
        evaluated_at = state["evaluated_at"]
        seconds_before = state["seconds"]
        _set_rng_states(state["rng"])

    to_label = category_to_label(train_coco, model.config.id2label)
    dataset = ShapesTrainSet(train_coco, read_targets(train_coco, to_label), config.preprocess)
    batch_size = min(config.batch_size, len(dataset))
    per_epoch = len(dataset) // batch_size
    stop = config.max_steps if config.max_steps is not None else math.inf
    if config.epochs is not None:
        stop = min(stop, config.epochs * per_epoch)
    stop = int(min(stop, UNBOUNDED))

    def total_seconds() -> float:  # wall time of every invocation of this run so far
        return seconds_before + time.perf_counter() - started

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "epoch": step // per_epoch, "best_ap": best_ap, "last_metrics": last_metrics,
            "evaluated_at": evaluated_at, "seconds": total_seconds(),
            "rng": _rng_states(), "config": asdict(config), "generator": generator,
        })

    def evaluate(partial: bool) -> None:
        nonlocal best_ap, last_metrics, evaluated_at
        evaluated_at = step
        t0 = time.perf_counter()
        metrics = evaluate_bbox(model, val_coco, device, config.eval_batch_size, config.preprocess)
        model.train()
        last_metrics = metrics
        record = {"event": "eval", "step": step, "epoch": step / per_epoch, "partial": partial,
                  "eval_s": round(time.perf_counter() - t0, 1), "bbox": metrics}
        if metrics["AP"] is not None and metrics["AP"] > best_ap:
            best_ap = metrics["AP"]
            record["best"] = True
            training = {"step": step, "epoch": step / per_epoch, "images_seen": step * batch_size,
                        "hours": total_seconds() / 3600,
                        "device": str(device), "threads": torch.get_num_threads(), "val_bbox": metrics,
                        "val_images": len(val_coco), "config": asdict(config)}
            export_model(model, out / EXPORT, generator, config.preprocess, training)
        _log(out / LOG, record)
        console.print(f"step {step} (epoch {step / per_epoch:.2f}): bbox AP {metrics['AP']:.3f} "
                      f"AP50 {metrics['AP50']:.3f}" + (" (best)" if record.get("best") else ""))

    model.train()
    sampler = StepBatches(len(dataset), batch_size, config.seed, step, stop)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_train, num_workers=config.workers,
                        worker_init_fn=_worker_init if config.workers else None,
                        # its own generator: making an iterator must not draw from the global RNG
                        # (dropout's), or a resumed run would drift from an uninterrupted one
                        generator=torch.Generator().manual_seed(config.seed))
    started = last_ckpt = time.perf_counter()
    train_s, images, losses = 0.0, 0, []

    def log_and_checkpoint() -> None:
        # images_per_s: wall clock of this invocation, evaluation included;
        # step_images_per_s: forward + backward + optimiser step alone (no data wait, no eval)
        elapsed = time.perf_counter() - started
        _log(out / LOG, {"event": "checkpoint", "step": step, "epoch": step / per_epoch,
                         "train_loss": float(np.mean(losses)) if losses else None,
                         "images_per_s": images / max(elapsed, 1e-9),
                         "step_images_per_s": images / max(train_s, 1e-9), "elapsed_s": round(elapsed, 1)})
        losses.clear()
        checkpoint()

    deadline = started + config.minutes * 60 if config.minutes is not None else math.inf
    with progress_bar(config.progress) as bar:
        task = bar.add_task("train demo", total=None if stop == UNBOUNDED else stop, completed=step, status="")
        for batch in loader:
            t0 = time.perf_counter()
            losses.append(train_step(model, optimizer, batch, step, config, device))
            step += 1
            now = time.perf_counter()
            train_s += now - t0
            images += len(batch["labels"])
            rate = images / max(now - started, 1e-9)
            bar.update(task, completed=step, status=f"ep {step / per_epoch:.2f} loss {losses[-1]:.3f} "
                                                    f"{rate:.1f} img/s")
            if step % per_epoch == 0:
                evaluate(partial=False)
            if time.perf_counter() >= deadline:
                break  # the final checkpoint below
            if time.perf_counter() - last_ckpt >= config.checkpoint_minutes * 60:
                log_and_checkpoint()
                last_ckpt = time.perf_counter()
    if evaluated_at != step:
        evaluate(partial=step % per_epoch != 0)
    log_and_checkpoint()
    return {"step": step, "epoch": step / per_epoch, "best_ap": best_ap, "last_metrics": last_metrics}


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m mfcache.demo_detector.train",
        description="Train the demo detector on a shapes data set. Example: python -m "
                    "mfcache.demo_detector.train --data /tmp/shapes --out /tmp/demo-run --minutes 60")
    defaults = TrainConfig(data="", out="")
    parser.add_argument("--data", required=True, help="shapes data set folder (annotations/, train/, val/)")
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, export/")
    parser.add_argument("--minutes", type=float, help="stop after this many minutes (this invocation)")
    parser.add_argument("--epochs", type=int, help="stop after this many epochs (in all)")
    parser.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    for f in fields(TrainConfig):
        if f.name in ("data", "out", "minutes", "epochs", "progress"):
            continue
        kind = {"max_steps": int, "lr_drop_step": int, "backbone_init": str}.get(f.name, type(getattr(defaults, f.name)))
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "progress"}
    return replace(TrainConfig(**values), progress=not args.no_progress), args.resume


def main(argv: list[str] | None = None) -> int:
    config, resume = parse_args(argv)
    try:
        summary = train(config, resume=resume)
    except MfcacheError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    console.print(f"done: step {summary['step']}, best bbox AP {summary['best_ap']:.3f}, "
                  f"export in {Path(config.out) / EXPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
