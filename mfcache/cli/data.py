"""`mfcache data`: datasets the project generates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import QuietOpt, user_errors
from mfcache.runtime import progress_bar, stdout

app = typer.Typer(help="Generate datasets.", no_args_is_help=True)


@app.command("shapes")
@user_errors
def shapes(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the dataset into.")],
    train: Annotated[int, typer.Option("--train", min=1, help="Number of training images.")] = 400,
    val: Annotated[int, typer.Option("--val", min=1, help="Number of validation images.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    quiet: QuietOpt = False,
):
    """Write the synthetic shapes dataset (COCO format: PNG images + instances JSON).

    Example: mfcache data shapes --out data/shapes --train 400 --val 100
    """
    from mfcache.data.shapes import write_shapes_dataset

    with progress_bar(not quiet) as bar:
        task = bar.add_task("shapes", total=train + val, status="")
        paths = write_shapes_dataset(
            out, num_train=train, num_val=val, seed=seed, progress=lambda n: bar.advance(task, n)
        )
    stdout.print(f"wrote {train} train + {val} val images: annotations {paths['train']} and {paths['val']}")
