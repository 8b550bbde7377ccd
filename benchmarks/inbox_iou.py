"""In-box mask IoU of a trained head on a cache split's positives.

For every detection matched to a GT instance at box IoU >= 0.5 (once per query, as training
selects them), the head's mask logits inside the box (its RoI size, M x M) are binarised at 0
and compared with the target crop resized to M x M and binarised at 0.5. The mean over
positives measures how well the head draws masks where the box is right, apart from
scoring, NMS and recall (which segm AP mixes in).

    python benchmarks/inbox_iou.py --cache mfcache-demo/cache --run mfcache-demo/run [--split val]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mfcache.cache.reader import Cache, CacheDataset
from mfcache.cache.sample import Batch
from mfcache.ops.losses import resize_targets
from mfcache.stages.postprocess import once_per_query, run_head
from mfcache.stages.runs import load_run


@torch.no_grad()
def inbox_iou(
    cache_path: Path,
    run_dir: Path,
    split: str = "val",
    *,
    min_iou: float = 0.5,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict:
    """{"positives": N, "inbox_iou": mean IoU, "split", "run"} over the first ``limit`` images."""
    cache = Cache(cache_path)
    device = torch.device("cpu")
    run = load_run(run_dir, cache.fingerprint, device)
    head = run.head
    dataset = CacheDataset(cache.path, split, levels=head.levels, c1=head.uses_c1, targets=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    ious = []
    for start in range(0, n, batch_size):
        batch = Batch.collate([dataset[i] for i in range(start, min(n, start + batch_size))]).to(device)
        select = once_per_query(batch.query_index, (batch.gt_id >= 0) & (batch.gt_iou >= min_iou))
        if not select.any():
            continue
        logits = run_head(head, batch, select).mask_logits.float()[:, 0]
        pred = logits > 0
        target = resize_targets(batch.target_masks[select], logits.shape[-1]) >= 0.5
        inter = (pred & target).flatten(1).sum(1)
        union = (pred | target).flatten(1).sum(1).clamp(min=1)
        ious.append(inter / union)
    iou = torch.cat(ious) if ious else torch.zeros(0)
    return {
        "run": str(run_dir),
        "split": split,
        "images": n,
        "positives": int(iou.numel()),
        "inbox_iou": round(float(iou.mean()), 4) if iou.numel() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, nargs="+")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for run in args.run:
        print(json.dumps(inbox_iou(args.cache, run, args.split, limit=args.limit)), flush=True)


if __name__ == "__main__":
    main()
