"""Does ``torch.compile`` of the mask head pay? Training steps, eager vs compiled, side by side.

    python benchmarks/compile_head.py --cache mfcache-demo/cache --out tmp/compile
    python benchmarks/compile_head.py --cache ... --device cuda --heads box_baseline paper_final

Each (head, mode) runs in its own process: ``Trainer.train_step`` over the same ``--steps``
batches (batch 8, seed 0), the head eager or wrapped in ``torch.compile`` with
``dynamic=True`` (symbolic shapes: the number of positives and the feature-map sizes change
every batch) or ``dynamic=False`` (one graph per shape: a recompile for every new shape). A
mode that fails or exceeds ``--timeout-s`` is recorded as such. Writes ``OUT/compile.json``:
per head and mode, the first step's seconds (compilation included), the median of the later
steps and the final loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("eager", "dynamic", "static")


def one_run(cache: str, head: str, mode: str, steps: int, device: str) -> dict:
    """Time ``steps`` training steps of ``head`` in ``mode`` (this process)."""
    import torch

    from mfcache.cache.reader import Cache
    from mfcache.cache.sample import on_device
    from mfcache.config import resolve_run_config
    from mfcache.distributed import init_world
    from mfcache.stages.train import Trainer

    config = resolve_run_config(
        head, [f"train.steps={steps}", "train.batch_size=8", "train.num_workers=1", f"train.device={device}"]
    )
    world, _ = init_world(torch.device(device))
    cache_ = Cache(Path(cache))
    trainer = Trainer(cache_, cache_.split(None, role="train"), config, world=world, device=torch.device(device))
    if mode != "eager":
        trainer.model = torch.compile(trainer.head, dynamic=mode == "dynamic")
    times, loss = [], None
    for batch in on_device(trainer.loader(), torch.device(device)):
        start = time.perf_counter()
        loss = trainer.train_step(batch, Path("unused.pt"))["loss"]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    later = sorted(times[2:]) or times
    return {"first_step_s": times[0], "median_step_s": later[len(later) // 2], "total_s": sum(times), "last_loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a cache to train from (e.g. the demo's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heads", nargs="+", default=["box_baseline", "blendmask", "paper_final"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per (head, mode) run")
    parser.add_argument("--one", nargs=2, metavar=("HEAD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.cache, *args.one, args.steps, args.device)))
        return
    results = {"cache": args.cache, "device": args.device, "steps": args.steps, "runs": []}
    for head in args.heads:
        for mode in args.modes:
            command = [
                sys.executable,
                __file__,
                "--cache",
                args.cache,
                "--out",
                str(args.out),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
                "--one",
                head,
                mode,
            ]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
                row = (
                    json.loads(done.stdout.strip().splitlines()[-1])
                    if done.returncode == 0
                    else {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
                )
            except subprocess.TimeoutExpired:
                row = {"error": f"not done in {args.timeout_s:.0f} s"}
            results["runs"].append({"head": head, "mode": mode, **row})
            print(json.dumps(results["runs"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
