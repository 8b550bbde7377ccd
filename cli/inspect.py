"""`mfcache inspect`: what a cache holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfcache.cli.common import user_errors
from mfcache.runtime import console

SHOWN_ANNOTATIONS = 20  # skipped annotations listed one per line; the rest are counted


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


@user_errors
def command(cache: Annotated[Path, typer.Argument(help="Cache folder.")]):
    """Show a cache's fingerprint, splits, and every array's shape, dtype and size.

    Per split also how many GT instances a cached query matches at box IoU >= 0.5 (the
    train.min_iou default: only those train the head) and the detector's box recall at 0.5.

    Example: mfcache inspect caches/ddetr
    """
    import zarr
    from rich.table import Table
    from mfcache.cache.reader import Cache
    from mfcache.cache.stats import group_stats, stored_stats
    from mfcache.errors import MfcacheError

    c = Cache(cache)
    det, ext = c.detector, c.extract
    console.print(f"[bold]{c.path}[/bold]  (schema {c.fingerprint['schema_version']}, "
                  f"written by mfcache {c.fingerprint['mfcache_version']})")
    console.print(f"detector  {det.spec}  family={det.family}  weights={det.weights_sha256[:16]}  "
                  f"trained={det.trained}")
    console.print(f"          d_model={det.d_model} queries={det.num_queries} classes={len(det.label_names)} "
                  f"strides={list(det.strides)} c1_channels={det.c1_channels} sigmoid={det.sigmoid}")
    p = det.preprocess
    console.print(f"preprocess shortest_edge={p.shortest_edge} longest_edge={p.longest_edge} "
                  f"pad_divisor={p.pad_divisor} pad_size={p.pad_size and list(p.pad_size)} mean={list(p.mean)} std={list(p.std)} "
                  f"resize={p.resize}")
    console.print("extract   " + " ".join(f"{k}={v}" for k, v in ext.items()))
    for name in c.splits:
        split = c.split(name)
        done = len(split.done)
        skipped = split.skipped
        console.print(f"\n[bold]split {name}[/bold]: {done}/{split.num_images} images complete"
                      + (f", {len(skipped)} skipped" if skipped else "") + "; "
                      f"annotations {split.attrs['annotation_file']} (sha256 {split.attrs['annotations_sha256'][:16]})")
        for image_id, reason in sorted(skipped.items()):
            console.print(f"  skipped image id {image_id}: {reason}", highlight=False, soft_wrap=True)
        left_out = sorted(split.skipped_annotations.items())
        for ann_id, reason in left_out[:SHOWN_ANNOTATIONS]:
            console.print(f"  skipped annotation id {ann_id}: {reason}", highlight=False, soft_wrap=True)
        if len(left_out) > SHOWN_ANNOTATIONS:
            console.print(f"  ... {len(left_out) - SHOWN_ANNOTATIONS} more skipped annotations", highlight=False)
        match, when = stored_stats(split.group), "recorded at extraction"
        if match is None and done:  # a cache written before extraction recorded it, or an unfinished split
            match, when = group_stats(split.group), f"computed now over the {done} complete images"
        if match is not None:
            console.print(f"targets: {match.line()} ({when}; train.min_iou decides which queries train)",
                          highlight=False, soft_wrap=True)
        table = Table()
        for column in ("array", "shape", "dtype", "chunks", "bytes", "stored"):
            table.add_column(column, no_wrap=column in ("array", "shape"),
                             justify="right" if column in ("bytes", "stored") else "left")
        total = 0
        try:
            members = sorted(split.group.members(max_depth=None))
        except Exception as exc:  # zarr raises many types for a metadata file that does not parse
            raise MfcacheError(f"split {name!r} of {c.path}: unreadable array metadata ({type(exc).__name__}: "
                               f"{exc}): the cache is damaged (mfcache verify {c.path} lists all damage)") from None
        for path, node in members:
            if isinstance(node, zarr.Array):
                stored = node.nbytes_stored()
                total += stored
                table.add_row(path, str(node.shape), str(node.dtype), str(node.chunks), _size(node.nbytes), _size(stored))
        console.print(table)
        console.print(f"split {name}: {_size(total)} on disk, {_size(total / max(split.num_images, 1))} per image")
