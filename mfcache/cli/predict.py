"""`mfcache predict`: the frozen detector and a trained head on any images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import JsonOpt, QuietOpt, TrustOpt, print_json, user_errors
from mfcache.runtime import stdout


@user_errors
def command(
    images: Annotated[
        list[Path],
        typer.Argument(help="Image files and/or folders (a folder's images, sorted; subfolders too with --recursive)."),
    ],
    run: Annotated[Path, typer.Option("--run", help="Run folder written by `mfcache train`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for results.json, images.json, overlays/ and masks/.")],
    detector: Annotated[
        str | None,
        typer.Option(
            "--detector", help="Detector spec (default: the one the run's cache was extracted with, as recorded there)."
        ),
    ] = None,
    score_threshold: Annotated[
        float,
        typer.Option(
            "--score-threshold",
            min=0.0,
            max=1.0,
            help="Overlays draw detections scoring at least this "
            "(results.json keeps all: COCO AP needs the full ranking).",
        ),
    ] = 0.3,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per detector batch.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    recursive: Annotated[
        bool,
        typer.Option(
            "--recursive",
            "-r",
            help="Also read the images in a folder's "
            "subfolders (not hidden ones, not --out); output names keep the "
            "relative path: overlays/<sub>/<name>.png.",
        ),
    ] = False,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Skip images that cannot be decoded (a warning line each, listed in the summary) instead of stopping.",
        ),
    ] = False,
    masks: Annotated[
        str,
        typer.Option(
            "--masks",
            help="Also write masks of the detections scoring at least "
            "--score-threshold: 'instance' (masks/<name>/<k>_<category>.png, one 1-bit "
            "PNG each), 'label' (masks/<name>.png, 16-bit: pixel = k, 0 = none) or "
            "'none'. k: the detection's 1-based place among the image's entries in "
            "results.json.",
        ),
    ] = "none",
    no_overlays: Annotated[bool, typer.Option("--no-overlays", help="Write no overlay pictures.")] = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    as_json: JsonOpt = False,
):
    """Segment images with the frozen detector and a trained mask head.

    Writes OUT/results.json (COCO results: bbox, score, RLE mask), OUT/images.json (a COCO
    file of the images, ids 1..N in input order, so pycocotools can load the results), one
    overlay per image in OUT/overlays/<name>.png (RGBA if the image has alpha) unless
    --no-overlays, and with --masks the masks as PNGs in OUT/masks/. --json prints the
    summary with each image's detection count (all, and drawn: at or above --score-threshold),
    output paths and the images --skip-bad skipped.

    Example: mfcache predict --run runs/baseline photos/ extra.jpg --out predictions --masks instance
    """
    from mfcache.checkpoint_io import trusting
    from mfcache.outputs import check_folder
    from mfcache.stages.predict import predict_images

    check_folder(out, "--out")  # a file or a read-only place: before the detector loads
    with trusting(trust_checkpoint):  # the detector's checkpoint and the run's
        summary = predict_images(
            detector=detector,
            run_dir=run,
            inputs=images,
            out=out,
            score_threshold=score_threshold,
            device=device,
            batch_size=batch_size,
            progress=not quiet,
            recursive=recursive,
            skip_bad=skip_bad,
            overlays=not no_overlays,
            masks=masks,
        )
    report(summary, score_threshold=score_threshold, as_json=as_json)


def report(summary, *, score_threshold: float, as_json: bool) -> None:
    """The summary on stdout: one JSON document, or a line (and one naming skipped images)."""
    drawn = sum(image["drawn"] for image in summary.per_image)
    if as_json:
        print_json(
            {
                "num_images": summary.num_images,
                "num_detections": summary.num_detections,
                "num_drawn": drawn,
                "score_threshold": score_threshold,
                "results": summary.results,
                "images": summary.images,
                "overlays": summary.overlays,
                "masks": summary.masks,
                "per_image": summary.per_image,
                "skipped": summary.skipped,
            }
        )
        return
    wrote = "".join(
        f", {what} in {where}/" for what, where in (("overlays", summary.overlays), ("masks", summary.masks)) if where
    )
    stdout.print(
        f"{summary.num_images} images, {summary.num_detections} detections ({drawn} scoring at least "
        f"{score_threshold:g}{', drawn' if summary.overlays else ''}): {summary.results}{wrote}",
        soft_wrap=True,
    )
    if summary.skipped:
        stdout.print(
            f"{len(summary.skipped)} skipped (cannot be decoded): "
            + ", ".join(item["file"] for item in summary.skipped),
            soft_wrap=True,
            highlight=False,
        )
