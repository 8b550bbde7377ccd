"""`mfcache extract`: stage 1, run the frozen detector once and cache its outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import EXTRACT_FLAGS, QuietOpt, SplitOpt, TrustOpt, cache_place, user_errors
from mfcache.config import ExtractConfig, check_config
from mfcache.errors import MfcacheError
from mfcache.runtime import stdout

_D = ExtractConfig()
_FIELDS = {f.name: f for f in dataclasses.fields(ExtractConfig)}


def _option(name: str):
    """The option of ExtractConfig field ``name``: its flag, help and lower bound, from the field
    (a list option, like --levels, is parsed from text here and checked item by item later)."""
    f = _FIELDS[name]
    return typer.Option(
        EXTRACT_FLAGS[name], help=f.metadata["help"], min=None if isinstance(f.default, tuple) else f.metadata["min"]
    )


@user_errors(interrupted="finished blocks are kept; run the same command again to resume")
def command(
    detector: Annotated[
        str,
        typer.Option(
            "--detector",
            help="Detector spec: 'demo', 'hf:<checkpoint dir>', 'hdetr:<file.pth>[?options]' or 'dino:<file.pth>[?options]'.",
        ),
    ],
    images: Annotated[Path, typer.Option("--images", help="Folder the annotation file's file_names are relative to.")],
    annotations: Annotated[Path, typer.Option("--annotations", help="COCO instances JSON of the split.")],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            help="Cache folder, or an object-store URL like s3://bucket/caches/x "
            "(also gs://, az://); created, or completed if it exists.",
        ),
    ],
    split: SplitOpt = None,
    topk: Annotated[int, _option("topk")] = _D.topk,
    batch_size: Annotated[int, _option("batch_size")] = _D.batch_size,
    c1: Annotated[str, _option("c1")] = _D.c1,
    dtype: Annotated[str, _option("dtype")] = _D.dtype,
    levels: Annotated[str, _option("levels")] = ",".join(map(str, _D.levels)),
    compress: Annotated[bool, _option("compress")] = _D.compress,
    resize: Annotated[str, _option("resize")] = _D.resize,
    target_size: Annotated[int, _option("target_size")] = _D.target_size,
    workers: Annotated[int, _option("num_workers")] = _D.num_workers,
    block_size: Annotated[int, _option("block_size")] = _D.block_size,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Record unreadable images and bad annotations as skipped (see `mfcache inspect`) instead of stopping.",
        ),
    ] = False,
    ignore_free_space: Annotated[
        bool,
        typer.Option(
            "--ignore-free-space",
            help="Go on even if the storage plan (printed before the first batch) needs more than the free space.",
        ),
    ] = False,
    device: Annotated[str, _option("device")] = _D.device,
    amp: Annotated[str, _option("amp")] = _D.amp,
    label_map: Annotated[Path | None, _option("label_map")] = None,
    class_agnostic: Annotated[bool, _option("class_agnostic")] = _D.class_agnostic,
    prompts: Annotated[Path | None, _option("prompts")] = None,
    views: Annotated[int, _option("views")] = _D.views,
    view_crop: Annotated[float, _option("view_crop")] = _D.view_crop,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
):
    """Run the frozen detector over a COCO split and write its outputs to a Zarr cache.

    The split is named after the annotation file (instances_val2017.json -> val2017) unless
    --split is given. Re-running the same command resumes an interrupted extraction.

    Detector labels map to the dataset categories of the same name; --label-map FILE maps
    others (JSON {"detector label": "category name" or id}), --class-agnostic makes every
    detection a candidate and scores all categories as one. Categories no label maps to are
    named in a warning.

    Open-vocabulary detectors (Grounding DINO, MM Grounding DINO, OmDet-Turbo) detect the
    phrases of a text prompt: by default the dataset's category names, or --prompts FILE
    (JSON ["phrase", ...] or {"category name": "phrase"}); the prompt is part of the cache.

    --views N stores every image N times: view 0 as it is, views 1.. flipped and/or rescaled,
    each a full detector pass with its own targets; training draws one view per image per
    epoch, eval and predict use view 0. --view-crop P first crops a view >= 1 with probability P
    (each side 0.5..1.0 of the image's; the GT cropped with it).

    Under `torchrun --nproc_per_node N -m ...` (or the `mfcache` script run by torchrun) the
    processes share the blocks, one GPU each; the cache is the same as a one-process run's.

    Example: mfcache extract --detector hf:checkpoints/deformable-detr --images coco/val2017 --annotations coco/annotations/instances_val2017.json --out caches/ddetr
    """
    from mfcache.checkpoint_io import trusting
    from mfcache.distributed import world_from_env
    from mfcache.stages.extract import extract

    try:
        level_list = tuple(int(v) for v in levels.split(",") if v.strip())
    except ValueError:
        raise MfcacheError(f"--levels takes comma-separated level indices like 0,1; got {levels!r}") from None
    config = ExtractConfig(
        topk=topk,
        batch_size=batch_size,
        c1=c1,
        dtype=dtype,
        target_size=target_size,
        num_workers=workers,
        device=device,
        block_size=block_size,
        levels=level_list,
        compress=compress,
        resize=resize,
        amp=amp,
        label_map=str(label_map or ""),
        class_agnostic=class_agnostic,
        prompts=str(prompts or ""),
        views=views,
        view_crop=view_crop,
    )
    check_config(config)  # before anything starts (its errors name the options as typed: CLI_NAMES)
    with trusting(trust_checkpoint):  # the detector's checkpoint
        summary = extract(
            detector=detector,
            images=images,
            annotations=annotations,
            out=cache_place(out),
            split=split,
            config=config,
            skip_bad=skip_bad,
            ignore_free_space=ignore_free_space,
            progress=not quiet,
        )
    if world_from_env().rank:  # under torchrun, rank 0 reports for all
        return
    skipped = f", {summary.skipped} skipped: see `mfcache inspect {summary.cache}`" if summary.skipped else ""
    unit = " rows" if summary.views > 1 else ""
    stdout.print(
        f"split {summary.split!r}: {summary.rows_line()} cached in {summary.cache} "
        f"({summary.written}{unit} written now{skipped})",
        highlight=False,
    )
    if summary.annotations:
        see = f" (see `mfcache inspect {summary.cache}`)" if summary.skipped_annotations else ""
        stdout.print(summary.annotations + see, highlight=False)
    if summary.match is not None:
        stdout.print(f"split {summary.split!r}: {summary.match.line()}", highlight=False)
