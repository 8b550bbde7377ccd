"""`mfcache demo`: the whole pipeline on generated data and the built-in detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import RERUN, QuietOpt, user_errors
from mfcache.runtime import console, stdout
from mfcache.stages.demo import DEMO_HEAD


@user_errors(interrupted=RERUN)
def command(
    out: Annotated[Path, typer.Option("--out", help="Folder for data, cache, run and metrics.")] = Path("mfcache-demo"),
    train_images: Annotated[int, typer.Option("--train", min=1, help="Generated training images.")] = 400,
    val_images: Annotated[int, typer.Option("--val", min=1, help="Generated validation images.")] = 100,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Mask-head training steps (batch 8).")] = 1500,
    head: Annotated[str, typer.Option("--head", help="Head preset (see `mfcache heads`) or TOML file.")] = DEMO_HEAD,
    device: Annotated[
        str, typer.Option("--device", help="auto (a GPU if there is one), cpu, cuda or cuda:N.")
    ] = "auto",
    quiet: QuietOpt = False,
):
    """Run the whole pipeline on generated data and the built-in detector.

    Generates the shapes dataset, extracts the demo detector into a cache, trains a mask
    head (the BlendMask preset by default) from the cache and evaluates it.

    Leaves OUT/data, OUT/cache, OUT/run, OUT/metrics.json and OUT/overlays/ (4 val images,
    ground truth | prediction); running it again resumes.

    Example: mfcache demo --out mfcache-demo
    """
    from mfcache.metrics import metrics_table
    from mfcache.stages.demo import run_demo

    result = run_demo(
        out,
        train_images=train_images,
        val_images=val_images,
        steps=steps,
        head=head,
        device=device,
        progress=not quiet,
        say=console.rule,
    )
    stdout.print(metrics_table(result.metrics, title=f"demo: COCO AP on {result.metrics['num_images']} val images"))
    if result.detector_trained:
        stdout.print(result.detector_note)
    else:  # a warning
        console.print(f"[bold yellow]note:[/bold yellow] {result.detector_note}")
    stdout.print(f"{len(result.overlays)} overlays (ground truth | prediction): {result.overlays_dir}/")
    stdout.print(f"done in {result.seconds:.0f} s: {out}/metrics.json, cache {result.cache}, run {result.run}")
