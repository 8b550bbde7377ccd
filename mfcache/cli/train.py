"""`mfcache train`: stage 2, train a mask head from the cache alone."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import (
    CacheOpt,
    DeviceOpt,
    LocalCacheOpt,
    LocalCacheSizeOpt,
    QuietOpt,
    SetOpt,
    SplitOpt,
    StepsOpt,
    TrustOpt,
    cache_place,
    train_overrides,
    user_errors,
)
from mfcache.config import resolve_run_config
from mfcache.runtime import stdout


def resume_command(args: dict) -> str:
    """The command that resumes this run from the checkpoint an interrupted run saved (a
    second Ctrl-C stops at once: then from the last periodic checkpoint, if there is one)."""
    from mfcache.stages.runs import CHECKPOINT

    if not (Path(args["out"]) / CHECKPOINT).is_file():
        return "no checkpoint was saved yet: run the same command again to start over"
    words = ["mfcache", "train", "--cache", str(args["cache"]), "--out", str(args["out"]), "--resume"]
    if args.get("split"):
        words += ["--split", args["split"]]
    return "resume with: " + shlex.join(words)


@user_errors(interrupted=resume_command)
def command(
    cache: CacheOpt,
    out: Annotated[Path, typer.Option("--out", help="Run folder for the checkpoint, config and log.")],
    head: Annotated[
        str | None, typer.Option("--head", help="Head preset name (see `mfcache heads`) or a TOML file.")
    ] = None,
    overrides: SetOpt = None,
    steps: StepsOpt = None,
    device: DeviceOpt = None,
    split: SplitOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its checkpoint, with the "
            "configuration stored there (--set train.steps=N extends it).",
        ),
    ] = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    local_cache: LocalCacheOpt = None,
    local_cache_size: LocalCacheSizeOpt = None,
):
    """Train a mask head on a cache split (the detector is never loaded).

    Ctrl-C, SIGTERM or SIGUSR1 stops after the current step and saves a checkpoint; --resume continues
    it exactly as if it had never stopped. The resolved settings are printed as it starts;
    --set train.eval_every=N validates every N steps (segm AP on the val split, the best head
    kept as RUN/best.pt) and train.tensorboard=true writes TensorBoard scalars to RUN/tensorboard/.

    Example: mfcache train --cache caches/ddetr --head box_baseline --steps 2000 --device cuda --out runs/baseline
    """
    from mfcache.checkpoint_io import trusting
    from mfcache.distributed import world_from_env
    from mfcache.stages.train import train

    overrides = train_overrides(overrides, steps=steps, device=device)
    cache = cache_place(cache, local_cache, local_cache_size)
    # resuming: the run's own configuration (+ --set), unless --head names one in full
    config = resolve_run_config(head, overrides) if head or not resume else None
    with trusting(trust_checkpoint):
        last = train(
            cache_path=cache,
            run_dir=out,
            config=config,
            overrides=None if config else overrides,
            split=split,
            resume=resume,
            progress=not quiet,
        )
    if world_from_env().rank:  # under torchrun, rank 0 reports for all
        return
    if last.get("finished"):
        stdout.print(
            f"{out} is already trained to step {last['step']}: to train it longer, "
            f"--resume --set train.steps=N with N > {last['step']}"
        )
        return
    loss = f"loss {last['loss']:.4f}" if last.get("loss") is not None else "no loss logged"
    stdout.print(f"trained {last['head']} to step {last['step']} ({loss}) in {last['seconds']:.0f} s: {out}")
