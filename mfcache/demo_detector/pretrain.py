"""Dense pretraining of the demo detector's backbone, before :mod:`mfcache.demo_detector.train`.

    python -m mfcache.demo_detector.pretrain --data DIR --out OUT --minutes 10

The demo backbone starts from random weights (nothing pretrained can be downloaded), and
a DETR learns shape features slowly through set matching alone. Semantic segmentation
gives every pixel a label instead: the backbone (with a small FPN-style head on its
stride 8/16/32 maps) learns to tell the six shapes apart and find their outlines in
minutes. ``OUT/backbone.pt`` then starts the detector's backbone
(``python -m mfcache.demo_detector.train --backbone-init OUT/backbone.pt``); the head is
thrown away.

Conventions: the label map of an image is ``[h, w]`` int64 at input resolution: 0 for
background, ``1 + label`` on the visible pixels of an instance (label = the detector's
class index), :data:`IGNORE` on crowd regions. The loss is cross-entropy at stride 8
(labels picked by nearest-neighbour subsampling). Batches (images and horizontal flips)
come from :class:`~mfcache.demo_detector.data.FlipStepBatches`, as the detector's do, so
a run is a pure function of its seed. ``backbone.pt`` is written with
:func:`mfcache.checkpoint_io.save_checkpoint` (a state dict: tensors only) and
``pretrain.json`` with :func:`mfcache.outputs.atomic_write`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mfcache.checkpoint_io import save_checkpoint
from mfcache.data.coco import CocoDataset
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.demo_detector.data import UNBOUNDED, FlipStepBatches, category_to_label, read_split, worker_init
from mfcache.demo_detector.model import trainable_demo_model
from mfcache.detectors.base import Preprocess
from mfcache.detectors.demo import DEMO_PREPROCESS
from mfcache.errors import MfcacheError
from mfcache.outputs import atomic_write
from mfcache.runtime import console, progress_bar, resolve_device

IGNORE = 255
BACKBONE_FILE = "backbone.pt"


def backbone_of(model: nn.Module) -> nn.Module:
    """The ResNet inside a (trainable) demo model: ``pixel_values -> feature_maps`` at
    strides 8/16/32."""
    return model.model.backbone.model


class SegmentationHead(nn.Module):
    """``feature_maps`` (strides 8/16/32, channels ``in_channels``) -> logits
    ``[B, num_classes, H/8, W/8]``: 1x1 projections summed at stride 8, then a 3x3 conv."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, num_classes, 1)
        )

    def forward(self, maps: list[Tensor]) -> Tensor:
        size = maps[0].shape[-2:]
        fused = sum(
            F.interpolate(lat(m), size=size, mode="bilinear", align_corners=False) if i else lat(m)
            for i, (lat, m) in enumerate(zip(self.lateral, maps))
        )
        return self.fuse(F.relu(fused))


class SemanticShapes(Dataset):
    """Item ``(i, flip)`` -> ``(input [3, h, w], labels [h, w])`` (see the module docstring)."""

    def __init__(self, coco: CocoDataset, to_label: dict[int, int], preprocess: Preprocess = DEMO_PREPROCESS):
        self.coco, self.to_label, self.preprocess = coco, to_label, preprocess

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Tensor, Tensor]:
        index, flip = key
        image = self.coco.images[index]
        x = to_input(load_image(self.coco.image_path(image)), self.preprocess)
        gt = self.coco.ground_truth(image)
        labels = torch.zeros(image.height, image.width, dtype=torch.uint8)
        for mask, category, crowd in zip(gt.masks, gt.category_ids.tolist(), gt.iscrowd.tolist()):
            labels[mask] = IGNORE if crowd else 1 + self.to_label[category]
        labels = F.interpolate(labels[None, None].float(), size=x.shape[1:], mode="nearest")[0, 0].long()
        if flip:
            x, labels = x.flip(-1), labels.flip(-1)
        return x, labels


def segmentation_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """:class:`SemanticShapes` items -> ``pixel_values [B, 3, H, W]`` (padded to the demo
    canvas) and ``labels [B, H, W]`` (:data:`IGNORE` on the padding)."""
    pixel_values, _ = pad_batch([x for x, _ in items], DEMO_PREPROCESS)
    labels = torch.full((len(items), *pixel_values.shape[-2:]), IGNORE, dtype=torch.long)
    for b, (_, y) in enumerate(items):
        labels[b, : y.shape[0], : y.shape[1]] = y
    return pixel_values, labels


def labels_at(logits: Tensor, labels: Tensor) -> Tensor:
    """``labels [B, H, W]`` subsampled to the ``h x w`` of ``logits [B, K, h, w]``: the
    label at the centre of each output cell."""
    stride_y, stride_x = labels.shape[1] // logits.shape[2], labels.shape[2] // logits.shape[3]
    return labels[:, stride_y // 2 :: stride_y, stride_x // 2 :: stride_x][:, : logits.shape[2], : logits.shape[3]]


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``logits [B, K, h, w]`` against :func:`labels_at` (padding and
    crowds ignored)."""
    return F.cross_entropy(logits, labels_at(logits, labels), ignore_index=IGNORE)


def pretrain(
    data: Path,
    out: Path,
    *,
    minutes: float,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    shortest_edge: int = DEMO_PREPROCESS.shortest_edge,
    longest_edge: int = DEMO_PREPROCESS.longest_edge,
    workers: int = 1,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Train backbone + :class:`SegmentationHead` for ``minutes``; writes ``out/backbone.pt``
    (the backbone's state dict, batch norms trainable) and ``out/pretrain.json``; returns
    the summary ``{"steps", "images_seen", "minutes", "last_loss", "val_pixel_accuracy"}``."""
    out.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    train_coco, val_coco = read_split(data, "train"), read_split(data, "val")
    torch.manual_seed(seed)
    model = trainable_demo_model(seed)
    backbone = backbone_of(model).to(torch_device).train()
    to_label = category_to_label(train_coco, model.config.id2label)
    head = SegmentationHead(list(backbone.channels), 1 + len(model.config.id2label)).to(torch_device).train()
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    preprocess = replace(DEMO_PREPROCESS, shortest_edge=shortest_edge, longest_edge=longest_edge)
    dataset = SemanticShapes(train_coco, to_label, preprocess)
    loader = DataLoader(
        dataset,
        batch_sampler=FlipStepBatches(len(dataset), batch_size, seed, 0, UNBOUNDED),
        collate_fn=segmentation_collate,
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
    started, step, losses = time.perf_counter(), 0, []
    deadline = started + minutes * 60
    with progress_bar(progress) as bar:
        task = bar.add_task("pretrain backbone", total=None, status="")
        for pixel_values, labels in loader:
            loss = segmentation_loss(
                head(list(backbone(pixel_values.to(torch_device)).feature_maps)), labels.to(torch_device)
            )
            if not torch.isfinite(loss):
                raise MfcacheError(f"pretraining diverged: loss {loss.item()} at step {step}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(task, completed=step, status=f"loss {losses[-1]:.3f}")
            if time.perf_counter() >= deadline:
                break
    accuracy = pixel_accuracy(backbone, head, SemanticShapes(val_coco, to_label, preprocess), torch_device)
    save_checkpoint(out / BACKBONE_FILE, backbone.state_dict(), what="the pretrained backbone")
    summary = {
        "steps": step,
        "images_seen": step * batch_size,
        "minutes": (time.perf_counter() - started) / 60,
        "last_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "val_pixel_accuracy": accuracy,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "device": str(torch_device),
    }
    atomic_write(out / "pretrain.json", (json.dumps(summary, indent=2) + "\n").encode(), "the pretraining summary")
    return summary


@torch.no_grad()
def pixel_accuracy(backbone: nn.Module, head: nn.Module, dataset: SemanticShapes, device: torch.device) -> float:
    """Share of labelled (not ignored) stride-8 pixels of ``dataset`` classified right."""
    backbone.eval(), head.eval()
    right = total = 0
    for start in range(0, len(dataset), 8):
        items = [dataset[(i, False)] for i in range(start, min(start + 8, len(dataset)))]
        pixel_values, labels = segmentation_collate(items)
        logits = head(list(backbone(pixel_values.to(device)).feature_maps))
        small = labels_at(logits, labels.to(device))
        keep = small != IGNORE
        right += int((logits.argmax(1) == small)[keep].sum())
        total += int(keep.sum())
    backbone.train(), head.train()
    return right / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mfcache.demo_detector.pretrain",
        description="Pretrain the demo detector's backbone on shapes semantic segmentation. Example: python -m "
        "mfcache.demo_detector.pretrain --data /tmp/shapes --out /tmp/demo-pretrain --minutes 10",
    )
    parser.add_argument("--data", required=True, type=Path, help="shapes data set folder (annotations/, train/, val/)")
    parser.add_argument("--out", required=True, type=Path, help="folder for backbone.pt and pretrain.json")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        summary = pretrain(
            args.data,
            args.out,
            minutes=args.minutes,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            workers=args.workers,
            device=args.device,
            progress=not args.no_progress,
        )
    except MfcacheError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    console.print(
        f"done: {summary['steps']} steps, val pixel accuracy {summary['val_pixel_accuracy']:.3f}, "
        f"backbone in {args.out / BACKBONE_FILE}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
