"""What a per-pixel read-out of the cached features can reach: in-box mask IoU of probes.

    python benchmarks/feature_probe.py --cache mfcache-demo/cache --out tmp/probe

The paper's dot-product heads predict each pixel of a box as ``q . F / sqrt(C)`` with
``F = upsample(E) + neck(C1)``: a linear function of the features at that pixel. This fits
shared per-pixel classifiers on the same features and asks how far such read-outs go:

* inputs: for every positive (a query matched to a GT at box IoU >= 0.5, once per query) of
  the first ``--train-images`` / ``--val-images`` images, RoIAlign 32 x 32 (the heads' own
  matrix-form RoIAlign) of ``[upsample(E_level0), C1]`` at stride 4, and the GT crop resized
  to 32 x 32 (target >= 0.5);
* ``linear``: one logistic regression shared by all queries (LBFGS on 128 random pixels per
  train positive); the head can represent it exactly (its query projection has a bias);
* ``linear_on_val``: the same fit on the scored (val) positives themselves, an optimistic
  upper bound of a linear read-out;
* ``mlp``: a shared per-pixel MLP (C -> 256 -> 1, ReLU; Adam, 3000 steps of 8192 pixels):
  what a non-linear read-out of the same features reaches.

Metric: mean over val positives of IoU(logit > 0, target >= 0.5), the one
``benchmarks/inbox_iou.py`` reports for a trained head. Writes ``OUT/feature_probe.json/.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # noqa: E402

SIZE = 32


@torch.no_grad()
def roi_inputs(cache: Path, split: str, images: int) -> tuple[Tensor, Tensor]:
    """``X [N, C, 32, 32]`` (upsampled level 0 ++ C1, RoIAligned) and ``Y [N, 32, 32]`` bool."""
    from mfcache.cache.reader import CacheDataset
    from mfcache.cache.sample import Batch
    from mfcache.heads.fusion import FusedMap
    from mfcache.heads.region import FUSED_STRIDE, selected_rois
    from mfcache.heads.roi import roi_align
    from mfcache.ops.losses import resize_targets
    from mfcache.stages.postprocess import once_per_query

    dataset = CacheDataset(cache, split, levels=(0,), c1=True, targets=True)
    fused = FusedMap(encoder=None, multi_scale=False, index=0, upsample=2, mapper=nn.Identity(), neck=None)
    xs, ys = [], []
    n = min(images, len(dataset))
    for start in range(0, n, 8):
        batch = Batch.collate([dataset[i] for i in range(start, min(n, start + 8))]).to(torch.device("cpu"))
        select = once_per_query(batch.query_index, (batch.gt_id >= 0) & (batch.gt_iou >= 0.5))
        up = fused(batch.levels, None, batch.level_hw, batch.c1_hw)  # E at stride 4, each image's own extent
        maps = []
        for b, e in enumerate(up):
            h, w = batch.c1_hw[b].tolist()
            c1 = F.pad(batch.c1[b, :, :h, :w], (0, e.shape[-1] - w, 0, e.shape[-2] - h))
            maps.append(torch.cat([e, c1]))
        xs.append(roi_align(maps, selected_rois(batch.boxes, select), SIZE, 1 / FUSED_STRIDE).half())
        ys.append(resize_targets(batch.target_masks[select], SIZE) >= 0.5)
    return torch.cat(xs), torch.cat(ys)


def pixels(x: Tensor, y: Tensor, per: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``per`` random pixels of every positive: ``[N * per, C]`` features, ``[N * per]`` targets."""
    g = torch.Generator().manual_seed(seed)
    n, c = x.shape[:2]
    pick = torch.stack([torch.randperm(SIZE * SIZE, generator=g)[:per] for _ in range(n)])
    flat = x.float().flatten(2).transpose(1, 2)  # [N, 1024, C]
    return (
        flat.gather(1, pick[..., None].expand(-1, -1, c)).reshape(-1, c),
        y.flatten(1).gather(1, pick).reshape(-1).float(),
    )


@torch.no_grad()
def inbox_iou(model: nn.Module, x: Tensor, y: Tensor) -> float:
    ious = []
    for i in range(0, len(x), 256):
        pred = model(x[i : i + 256].float().permute(0, 2, 3, 1))[..., 0] > 0
        target = y[i : i + 256]
        ious.append((pred & target).flatten(1).sum(1) / (pred | target).flatten(1).sum(1).clamp(min=1))
    return float(torch.cat(ious).mean())


def fit_linear(px: Tensor, py: Tensor) -> nn.Module:
    model = nn.Linear(px.shape[1], 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(px)[:, 0], py)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def fit_mlp(px: Tensor, py: Tensor, steps: int = 3000) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(px.shape[1], 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        i = torch.randint(len(px), (8192,))
        loss = F.binary_cross_entropy_with_logits(model(px[i])[:, 0], py[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--mlp-steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tx, ty = roi_inputs(args.cache, args.train_split, args.train_images)
    vx, vy = roi_inputs(args.cache, args.val_split, args.val_images)
    train_px, train_py = pixels(tx, ty, 128)
    probes = {
        "linear": fit_linear(train_px, train_py),
        "linear_on_val": fit_linear(*pixels(vx, vy, 256)),
        "mlp": fit_mlp(train_px, train_py, args.mlp_steps),
    }
    results = {
        "cache": str(args.cache),
        "train_positives": len(tx),
        "val_positives": len(vx),
        "probes": {
            name: {"val_inbox_iou": inbox_iou(m, vx, vy), "train_inbox_iou": inbox_iou(m, tx, ty)}
            for name, m in probes.items()
        },
    }
    rows = [
        f"| probe ({len(tx)} train / {len(vx)} val positives) | val in-box IoU | train in-box IoU |",
        "|---|---:|---:|",
    ]
    rows += [
        f"| {name} | {r['val_inbox_iou']:.3f} | {r['train_inbox_iou']:.3f} |" for name, r in results["probes"].items()
    ]
    print(write_report(args.out, "feature_probe", results, "\n".join(rows)))


if __name__ == "__main__":
    main()
