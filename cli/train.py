"""`mfcache train`: stage 2, train a mask head from the cache alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import CacheOpt, QuietOpt, SetOpt, SplitOpt, TrustOpt, user_errors
from mfcache.config import resolve_run_config
from mfcache.runtime import console


@user_errors
def command(
    cache: CacheOpt,
    out: Annotated[Path, typer.Option("--out", help="Run folder for the checkpoint, config and log.")],
    head: Annotated[str | None, typer.Option("--head", help="Head preset name (see `mfcache heads`) or a TOML file.")] = None,
    overrides: SetOpt = None,
    split: SplitOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
):
    """Train a mask head on a cache split (the detector is never loaded).

    Example: mfcache train --cache caches/ddetr --head box_baseline --set train.steps=2000 --out runs/baseline
    """
    from mfcache.checkpoint_io import trusting
    from mfcache.engine import train

    config = resolve_run_config(head, overrides)
    with trusting(trust_checkpoint):
        last = train(cache_path=cache, run_dir=out, config=config, split=split, resume=resume, progress=not quiet)
    loss = f"loss {last['loss']:.4f}" if last.get("loss") is not None else "no loss logged"
    console.print(f"trained {config.head.name} to step {last['step']} ({loss}) in {last['seconds']:.0f} s: {out}")
