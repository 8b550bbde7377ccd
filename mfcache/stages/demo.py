"""The demo (`mfcache demo`): the whole pipeline on generated data and the built-in detector.

Under ``out``: ``data/`` (the shapes dataset, generated once), ``cache/`` (its train and val
splits extracted by the demo detector), ``run/`` (the trained head, with a copy of the
metrics), ``metrics.json`` and ``overlays/`` (a few val images, ground truth | prediction).
Running it again resumes: the data is kept, extraction finishes or skips its splits, and
training continues from the run's checkpoint.

Only light modules are imported at the top, so that the command line can read the
defaults here without importing torch; the stages are imported when the demo runs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.runtime import console, progress_bar

DEMO_OVERLAYS = 4  # val images drawn as ground truth | prediction panels
DEMO_HEAD = "blendmask"  # on the small demo detector's features, the head that learns masks fastest (docs/heads.md)
DEMO_LR = 1e-3  # a short schedule: 30 epochs of the 400 demo images at the default 1500 steps
# The demo stores C1 (not --c1 auto's recompute): its maps are ~86 KB per image (~43 MB for the
# 500 images), and re-making one costs ~14-18 ms of a CPU reader per training sample against
# ~9 ms to read the stored sample (docs/commands/index.md, extract --c1): on a CPU that would slow the 12,000 samples of training.
DEMO_C1 = "store"

UNTRAINED_NOTE = (
    "the demo detector is UNTRAINED (random weights from a fixed seed): its boxes are random, so "
    "these APs are near zero. The pipeline is real; the numbers are not meaningful until a trained "
    "demo detector ships."
)


@dataclass
class DemoResult:
    """What a demo run left: ``metrics`` (as in ``metrics.json``), the overlay panels, the
    folders, the seconds it took, and a line on the detector (``detector_note``: how the
    shipped weights were trained, or :data:`UNTRAINED_NOTE`)."""

    metrics: dict
    metrics_path: Path
    overlays: list[Path]
    overlays_dir: Path
    cache: Path
    run: Path
    seconds: float
    detector_trained: bool
    detector_note: str


def demo_detector_note() -> str:
    """One line on how the shipped demo detector was trained (its ``training.json``)."""
    from mfcache.detectors.demo import DEMO_WEIGHTS, TRAINING_FILE

    try:
        t = json.loads((DEMO_WEIGHTS / TRAINING_FILE).read_text())
        return (
            f"demo detector: trained {t['epoch']:.0f} epochs ({t['images_seen']:,} images, {t['hours']:.1f} h on "
            f"{t['device']}); bbox AP {t['val_bbox']['AP']:.3f} on {t['val_images']} shapes val images"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "demo detector: trained weights (no training.json next to them)"


def run_demo(
    out: Path,
    *,
    train_images: int = 400,
    val_images: int = 100,
    steps: int = 1500,
    head: str = DEMO_HEAD,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> DemoResult:
    """Generate the data, extract, train and evaluate under ``out`` (see the module docstring),
    resuming whatever an earlier run finished. ``say`` receives each stage's heading as it
    starts (default: a rule on the console); ``progress``: progress bars; ``device``: where
    the detector and the head run (``auto``: a GPU if there is one). An unknown ``head``
    fails before anything is written."""
    from mfcache.stages.evaluate import evaluate
    from mfcache.stages.train import train
    from mfcache.stages.visualize import visualize_split

    started = time.perf_counter()
    say = say or console.rule
    config = resolve_run_config(
        head,
        [
            f"train.steps={steps}",
            f"train.lr={DEMO_LR}",  # a bad head fails first
            f"train.device={device}",
        ],
    )
    out = Path(out)
    cache, run, overlays_dir = out / "cache", out / "run", out / "overlays"
    demo_cache(out, train_images=train_images, val_images=val_images, device=device, progress=progress, say=say)
    say(f"3/4  train: {config.head.name} head, from the cache alone")
    train(cache_path=cache, run_dir=run, config=config, resume=(run / "checkpoint.pt").exists(), progress=progress)
    say("4/4  eval: COCO AP with pycocotools")
    overlays: list[Path] = []
    metrics = evaluate(
        cache_path=cache,
        run_dir=run,
        out=out / "metrics.json",
        progress=progress,
        device=device,
        on_results=lambda split, results: overlays.extend(visualize_split(split, results, overlays_dir, DEMO_OVERLAYS)),
    )
    shutil.copyfile(out / "metrics.json", run / "metrics.json")
    json.loads((out / "metrics.json").read_text())  # written and readable
    trained = bool(metrics["detector"]["trained"])
    return DemoResult(
        metrics=metrics,
        metrics_path=out / "metrics.json",
        overlays=overlays,
        overlays_dir=overlays_dir,
        cache=cache,
        run=run,
        seconds=time.perf_counter() - started,
        detector_trained=trained,
        detector_note=demo_detector_note() if trained else UNTRAINED_NOTE,
    )


def demo_cache(
    out: Path,
    *,
    train_images: int = 400,
    val_images: int = 100,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Stages 1-2 of the demo: the shapes data under ``out/data`` (generated once) and its
    train and val splits extracted by the demo detector into ``out/cache`` (finished splits are
    skipped). Returns the cache folder."""
    from mfcache.stages.extract import extract

    say = say or console.rule
    out = Path(out)
    data, cache = out / "data", out / "cache"
    if not (data / "annotations" / "val.json").is_file():
        say("1/4  data: synthetic shapes (COCO format)")
        _write_data(data, train_images, val_images, progress)
    say("2/4  extract: frozen demo detector -> Zarr cache")
    for split in ("train", "val"):
        extract(
            detector="demo",
            images=data / split,
            annotations=data / "annotations" / f"{split}.json",
            out=cache,
            split=split,
            config=ExtractConfig(device=device, c1=DEMO_C1),
            progress=progress,
        )
    return cache


def _write_data(data: Path, train_images: int, val_images: int, progress: bool) -> None:
    """The shapes dataset (seed 0) under ``data``, with a progress bar."""
    from mfcache.data.shapes import write_shapes_dataset

    with progress_bar(progress) as bar:
        task = bar.add_task("shapes", total=train_images + val_images, status="")
        write_shapes_dataset(
            data, num_train=train_images, num_val=val_images, seed=0, progress=lambda n: bar.advance(task, n)
        )
