"""`mfcache demo`: the whole pipeline on generated data and the built-in detector."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import RERUN, QuietOpt, user_errors
from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.runtime import console, progress_bar

DEMO_OVERLAYS = 4  # val images drawn as ground truth | prediction panels
DEMO_HEAD = "blendmask"  # on the small demo detector's features, the head that learns masks fastest (README)
DEMO_LR = 1e-3           # a short schedule: 30 epochs of the 400 demo images at the default 1500 steps


def demo_detector_note() -> str:
    """One line on how the shipped demo detector was trained (its ``training.json``)."""
    from mfcache.detectors.demo import DEMO_WEIGHTS, TRAINING_FILE

    try:
        t = json.loads((DEMO_WEIGHTS / TRAINING_FILE).read_text())
        return (f"demo detector: trained {t['epoch']:.0f} epochs ({t['images_seen']:,} images, {t['hours']:.1f} h on "
                f"{t['device']}); bbox AP {t['val_bbox']['AP']:.3f} on {t['val_images']} shapes val images")
    except (OSError, ValueError, KeyError, TypeError):
        return "demo detector: trained weights (no training.json next to them)"


@user_errors(interrupted=RERUN)
def command(
    out: Annotated[Path, typer.Option("--out", help="Folder for data, cache, run and metrics.")] = Path("mfcache-demo"),
    train_images: Annotated[int, typer.Option("--train", min=1, help="Generated training images.")] = 400,
    val_images: Annotated[int, typer.Option("--val", min=1, help="Generated validation images.")] = 100,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Mask-head training steps (batch 8).")] = 1500,
    head: Annotated[str, typer.Option("--head", help="Head preset (see `mfcache heads`) or TOML file.")] = DEMO_HEAD,
    quiet: QuietOpt = False,
):
    """Run the whole pipeline on generated data and the built-in detector.

    Generates the shapes dataset, extracts the demo detector into a cache, trains a mask
    head (the BlendMask preset by default) from the cache and evaluates it.

    Leaves OUT/data, OUT/cache, OUT/run, OUT/metrics.json and OUT/overlays/ (4 val images,
    ground truth | prediction); running it again resumes.

    Example: mfcache demo --out mfcache-demo
    """
    from mfcache.data.shapes import write_shapes_dataset
    from mfcache.stages.evaluate import evaluate
    from mfcache.stages.train import train
    from mfcache.metrics import metrics_table
    from mfcache.stages.extract import extract
    from mfcache.stages.visualize import visualize_split

    started = time.perf_counter()
    config = resolve_run_config(head, [f"train.steps={steps}", f"train.lr={DEMO_LR}"])  # a bad --head fails first
    data = out / "data"
    progress = not quiet
    if not (data / "annotations" / "val.json").is_file():
        console.rule("1/4  data: synthetic shapes (COCO format)")
        with progress_bar(progress) as bar:
            task = bar.add_task("shapes", total=train_images + val_images, status="")
            write_shapes_dataset(data, num_train=train_images, num_val=val_images, seed=0,
                                 progress=lambda n: bar.advance(task, n))
    console.rule("2/4  extract: frozen demo detector -> Zarr cache")
    for split in ("train", "val"):
        summary = extract(detector="demo", images=data / split, annotations=data / "annotations" / f"{split}.json",
                          out=out / "cache", split=split, config=ExtractConfig(), progress=progress)
    console.rule(f"3/4  train: {config.head.name} head, from the cache alone")
    run = out / "run"
    train(cache_path=out / "cache", run_dir=run, config=config, resume=(run / "checkpoint.pt").exists(),
          progress=progress)
    console.rule("4/4  eval: COCO AP with pycocotools")
    overlays: list[Path] = []
    metrics = evaluate(cache_path=out / "cache", run_dir=run, out=out / "metrics.json", progress=progress,
                       on_results=lambda split, results: overlays.extend(
                           visualize_split(split, results, out / "overlays", DEMO_OVERLAYS)))
    shutil.copyfile(out / "metrics.json", run / "metrics.json")
    console.print(metrics_table(metrics, title=f"demo: COCO AP on {metrics['num_images']} val images"))
    if metrics["detector"]["trained"]:
        console.print(demo_detector_note())
    else:
        console.print("[bold yellow]note:[/bold yellow] the demo detector is UNTRAINED (random weights from a fixed "
                      "seed): its boxes are random, so these APs are near zero. The pipeline is real; the "
                      "numbers are not meaningful until a trained demo detector ships.")
    console.print(f"{len(overlays)} overlays (ground truth | prediction): {out / 'overlays'}/")
    console.print(f"done in {time.perf_counter() - started:.0f} s: {out}/metrics.json, cache {summary.cache}, run {run}")
    json.loads((out / "metrics.json").read_text())  # written and readable
