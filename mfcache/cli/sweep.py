"""`mfcache sweep`: train and evaluate many heads from one cache, one table of the runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import (
    RERUN,
    CacheOpt,
    DeviceOpt,
    JsonOpt,
    LocalCacheOpt,
    LocalCacheSizeOpt,
    QuietOpt,
    SetOpt,
    StepsOpt,
    TrustOpt,
    cache_place,
    print_json,
    user_errors,
)
from mfcache.runtime import console, stdout


@user_errors(interrupted=RERUN)
def command(
    cache: CacheOpt,
    heads: Annotated[list[str], typer.Option("--heads", help="`all`, a preset name or a head TOML file (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Sweep folder: one run folder per head + sweep.json/md/png.")],
    steps: StepsOpt = None,
    device: DeviceOpt = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    as_json: JsonOpt = False,
    local_cache: LocalCacheOpt = None,
    local_cache_size: LocalCacheSizeOpt = None,
):
    """Train and evaluate many heads from one cache, then tabulate them.

    Each head trains from the cache alone; the table has mask AP, size, training time and
    peak memory. Heads that already have metrics in --out are not retrained. The table shows
    AP in %; sweep.json (and --json, which prints it) holds fractions in [0, 1].

    Example: mfcache sweep --cache caches/ddetr --heads box_baseline --heads paper_final --steps 2000 --device cuda --out sweeps/ablation
    """
    from rich.table import Table

    from mfcache.checkpoint_io import trusting
    from mfcache.stages.sweep import AP_KEYS, sweep

    def report(row: dict, reused: bool) -> None:  # progress, on stderr
        ap = row["segm_AP"]
        console.print(
            f"{row['name']}: mask AP {'-' if ap is None else f'{100 * ap:.1f}'}{' (already done)' if reused else ''}"
        )

    cache = cache_place(cache, local_cache, local_cache_size)  # a folder (Path) or a place in object storage
    with trusting(trust_checkpoint):  # the run folders' checkpoints, a cache's stored C1 program
        rows = sweep(
            cache_path=cache,
            heads=heads,
            out_dir=out,
            steps=steps,
            device=device,
            overrides=overrides,
            progress=not quiet,
            on_row=report,
        )
    if as_json:
        print_json(rows)  # exactly what sweep.json holds
        return
    table = Table(title=f"mask AP (%) of {len(rows)} heads", caption="sweep.json holds AP as fractions in [0, 1]")
    for column in ("head", *AP_KEYS, "params", "train s", "peak MiB"):
        table.add_column(column, justify="left" if column == "head" else "right")
    for r in rows:
        aps = ["-" if r[f"segm_{k}"] is None else f"{100 * r[f'segm_{k}']:.1f}" for k in AP_KEYS]
        memory = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        table.add_row(r["name"], *aps, f"{r['params']:,}", f"{r['train_seconds']:.1f}", memory)
    stdout.print(table)
    stdout.print(f"written {out / 'sweep.json'}, sweep.md and sweep.png")
