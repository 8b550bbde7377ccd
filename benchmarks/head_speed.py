"""Training seconds per step of several heads, side by side on the same batches.

    python benchmarks/head_speed.py --cache mfcache-demo/cache --heads paper_final blendmask --out tmp/speed

One process, one Trainer per head (batch 8, seed 0, the heads' own presets), each head
reading the same images at every step (its own loader: its own levels), the heads' order alternating, after one
warm-up step each. The ratio of medians is what "equal wall time" between two heads means
on this machine (both measured under the same load). Writes ``OUT/head_speed.json`` and
``.md``: per head the median and mean seconds per step, and each head's time relative to the
fastest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # noqa: E402


def measure(cache: str, heads: list[str], steps: int, device: str) -> dict:
    import torch

    from mfcache.cache.reader import Cache
    from mfcache.cache.sample import on_device
    from mfcache.config import resolve_run_config
    from mfcache.distributed import init_world
    from mfcache.stages.train import Trainer

    dev = torch.device(device)
    world, _ = init_world(dev)
    cache_ = Cache(Path(cache))
    trainers = {}
    for head in heads:
        config = resolve_run_config(
            head, [f"train.steps={steps + 1}", "train.batch_size=8", "train.num_workers=1", f"train.device={device}"]
        )
        trainers[head] = Trainer(cache_, cache_.split(None, role="train"), config, world=world, device=dev)
    times: dict[str, list[float]] = {head: [] for head in heads}
    # one loader per head (each reads the levels its head needs), the same images in the same steps
    loaders = zip(*(on_device(trainers[head].loader(), dev) for head in heads))
    for i, batches in enumerate(loaders):
        order = list(zip(heads, batches))
        for head, batch in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            trainers[head].train_step(batch, Path("unused.pt"))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:  # step 0 is the warm-up
                times[head].append(time.perf_counter() - start)
    fastest = min(statistics.median(t) for t in times.values())
    return {
        head: {
            "median_step_s": statistics.median(t),
            "mean_step_s": statistics.fmean(t),
            "steps": len(t),
            "relative": statistics.median(t) / fastest,
        }
        for head, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--heads", nargs="+", default=["paper_final", "blendmask"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per head (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {
        "cache": args.cache,
        "device": args.device,
        "heads": measure(args.cache, args.heads, args.steps, args.device),
    }
    rows = ["| head | median s/step | mean s/step | × fastest |", "|---|---:|---:|---:|"]
    rows += [
        f"| {h} | {r['median_step_s']:.3f} | {r['mean_step_s']:.3f} | {r['relative']:.1f} |"
        for h, r in results["heads"].items()
    ]
    print(write_report(args.out, "head_speed", results, "\n".join(rows)))


if __name__ == "__main__":
    main()
