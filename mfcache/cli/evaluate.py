"""`mfcache eval`: stage 3, COCO mask and box AP of a trained head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import (
    CacheOpt,
    JsonOpt,
    LocalCacheOpt,
    LocalCacheSizeOpt,
    QuietOpt,
    TrustOpt,
    cache_place,
    print_json,
    user_errors,
)
from mfcache.runtime import stdout


@user_errors
def command(
    cache: CacheOpt,
    run: Annotated[Path, typer.Option("--run", help="Run folder written by `mfcache train`.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write metrics.json (default: RUN/metrics.json, "
            "RUN/metrics_best.json with --checkpoint best).",
        ),
    ] = None,
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            help="last: the run's last head (checkpoint.pt); best: "
            "its best by val segm AP (best.pt, kept when trained with "
            "train.eval_every).",
        ),
    ] = "last",
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Split of the cache (default: the val*/test* split; a train split is evaluated only when named).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    visualize: Annotated[
        int,
        typer.Option(
            "--visualize", min=0, help="Draw N images as ground truth | prediction panels in <metrics dir>/visualize/."
        ),
    ] = 0,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Image folder for --visualize, if it moved since "
            "extraction (default: the folder recorded in the cache).",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override an eval setting, e.g. eval.mask_threshold=0.4 or eval.amp=bf16 (repeatable)."
        ),
    ] = None,
    per_category: Annotated[
        bool,
        typer.Option(
            "--per-category", help="Also print AP per category (metrics.json always holds it, under per_category)."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a metrics file computed on another cache (refused otherwise).")
    ] = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    as_json: JsonOpt = False,
    local_cache: LocalCacheOpt = None,
    local_cache_size: LocalCacheSizeOpt = None,
):
    """Evaluate a trained head on a cache split with pycocotools (segm and bbox AP).

    Also scores the same detections with each mask filled to its box ("box_filled"),
    the floor a mask head must clear. --visualize N draws the first N images (replacing the
    panels a previous eval drew there). An existing metrics file computed on another cache
    is kept unless --force. The table shows AP in %; metrics.json (and --json, which prints
    it) holds fractions in [0, 1]. metrics.json also holds each category's AP (per_category)
    and, for a head trained on some categories (train.categories), the mean AP of the learned
    and of the held-out ones (category_subset).

    Example: mfcache eval --cache caches/ddetr --run runs/baseline --out runs/baseline/metrics.json
    """
    from mfcache.checkpoint_io import trusting
    from mfcache.metrics import category_table, metrics_table
    from mfcache.stages.evaluate import evaluate, metrics_path
    from mfcache.stages.visualize import visualize_split

    cache = cache_place(cache, local_cache, local_cache_size)
    out = out or metrics_path(run, checkpoint)
    panels = out.parent / "visualize"
    draw = (
        (lambda data, results: visualize_split(data, results, panels, visualize, images_dir=images))
        if visualize
        else None
    )
    with trusting(trust_checkpoint):
        metrics = evaluate(
            cache_path=cache,
            run_dir=run,
            split=split,
            out=out,
            device=device,
            progress=not quiet,
            overrides=overrides,
            force=force,
            checkpoint=checkpoint,
            on_results=draw,
        )
    if as_json:
        print_json(metrics)  # exactly what metrics.json holds
        return
    agnostic = ", class-agnostic: all categories as one" if metrics.get("class_agnostic") else ""
    stdout.print(
        metrics_table(metrics, title=f"COCO AP on {metrics['split']} ({metrics['num_images']} images{agnostic})")
    )
    subset = metrics.get("category_subset")
    if per_category and "per_category" in metrics:
        stdout.print(category_table(metrics["per_category"], subset["learned"] if subset else ()))
    if subset:
        ap = {
            k: "-" if subset[k] is None else f"{100 * subset[k]:.1f}" for k in ("segm_AP_learned", "segm_AP_held_out")
        }
        stdout.print(
            f"masks learned from {', '.join(subset['learned'])}: segm AP {ap['segm_AP_learned']}; held out "
            f"({', '.join(subset['held_out'])}): segm AP {ap['segm_AP_held_out']} (mean over categories)"
        )
    stdout.print(f"metrics written to {out}")
    if visualize:
        stdout.print(f"{min(visualize, metrics['num_images'])} panels (ground truth | prediction) in {panels}/")
