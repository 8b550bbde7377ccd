"""What every command shares: one-line user errors and option types."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from mfcache.errors import MfcacheError
from mfcache.runtime import console


def user_errors(fn):
    """Turn :class:`MfcacheError` into one red line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MfcacheError as exc:
            console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/bold red]: finished blocks are kept; run the command again to resume")
            raise typer.Exit(130) from None

    return wrapper


CacheOpt = Annotated[Path, typer.Option("--cache", help="Cache folder written by `mfcache extract`.")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="Split of the cache (default: train* for training, val* for eval).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config value, e.g. train.steps=500 or head.roi_size=64 (repeatable).")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-checkpoint",
    help="Load checkpoints (and a cache's stored C1 program) with the full unpickler, accepting types beyond "
         "tensors, containers and numbers. RISK: such a file can run any code on this machine; use only for "
         "files from a source you trust.")]
