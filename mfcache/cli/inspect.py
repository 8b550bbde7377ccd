"""`mfcache inspect`: what a cache holds."""

from __future__ import annotations

import json

from mfcache.cache.schema import format_bytes
from mfcache.cli.common import CacheArg, CacheOrOpt, JsonOpt, one_cache, print_json, user_errors
from mfcache.runtime import stdout

SHOWN_ANNOTATIONS = 20  # skipped annotations listed one per line; the rest are counted


@user_errors
def command(cache: CacheArg = None, cache_opt: CacheOrOpt = None, as_json: JsonOpt = False):
    """Show a cache's fingerprint, splits, and every array's shape, dtype and size.

    The fingerprint includes the text prompt of an open-vocabulary detector (its phrases are
    its labels).

    Per split also how detector labels map to dataset categories (by name, a --label-map or
    class-agnostic) and which categories no label maps to, how many GT instances a cached
    query matches at box IoU >= 0.5 (the train.min_iou default: only those train the head)
    and the detector's box recall at 0.5.
    --json prints the same description as one JSON document.

    Example: mfcache inspect caches/ddetr  (or: mfcache inspect --cache caches/ddetr)
    """
    cache = one_cache(cache, cache_opt)
    from mfcache.cache.report import describe
    from mfcache.errors import MfcacheError

    report = describe(cache)
    if as_json:
        print_json(report)  # with its "error" key, if damage stopped it (and exit 1 below)
    else:
        _print_fingerprint(report)
        for split in report["splits"]:
            _print_split(split)
    if "error" in report:  # damage stopped the description: shown after what it gathered
        raise MfcacheError(report["error"])


def _print_fingerprint(report: dict) -> None:
    det, p = report["detector"], report["detector"]["preprocess"]
    stdout.print(
        f"[bold]{report['path']}[/bold]  (schema {report['schema_version']}, "
        f"written by mfcache {report['mfcache_version']})"
    )
    stdout.print(
        f"detector  {det['spec']}  family={det['family']}  weights={det['weights_sha256'][:16]}  "
        f"trained={det['trained']}"
    )
    stdout.print(
        f"          d_model={det['d_model']} queries={det['num_queries']} classes={len(det['label_names'])} "
        f"strides={list(det['strides'])} c1_channels={det['c1_channels']} sigmoid={det['sigmoid']}"
    )
    if det.get("prompts"):  # an open-vocabulary detector: its classes are these phrases
        stdout.print(
            f"prompt    {len(det['prompts'])} phrases: " + ", ".join(json.dumps(p) for p in det["prompts"]),
            highlight=False,
            soft_wrap=True,
        )
    stdout.print(
        f"preprocess shortest_edge={p['shortest_edge']} longest_edge={p['longest_edge']} "
        f"pad_divisor={p['pad_divisor']} pad_size={p['pad_size'] and list(p['pad_size'])} "
        f"mean={list(p['mean'])} std={list(p['std'])} resize={p['resize']}"
    )
    stdout.print("extract   " + " ".join(f"{k}={v}" for k, v in report["extract"].items() if k != "label_map"))


def _print_split(split: dict) -> None:
    from rich.table import Table

    name, skipped, left_out = split["name"], split["skipped_images"], split["skipped_annotations"]
    views = f" ({split['views']} views each, {split['rows']} rows)" if split.get("views", 1) > 1 else ""
    stdout.print(
        f"\n[bold]split {name}[/bold]: {split['complete']}/{split['images']} images complete{views}"
        + (f", {len(skipped)} skipped" if skipped else "")
        + "; "
        f"annotations {split['annotation_file']} (sha256 {split['annotations_sha256'][:16]})"
    )
    for image in skipped:
        stdout.print(f"  skipped image id {image['id']}: {image['reason']}", highlight=False, soft_wrap=True)
    for ann in left_out[:SHOWN_ANNOTATIONS]:
        stdout.print(f"  skipped annotation id {ann['id']}: {ann['reason']}", highlight=False, soft_wrap=True)
    if len(left_out) > SHOWN_ANNOTATIONS:
        stdout.print(f"  ... {len(left_out) - SHOWN_ANNOTATIONS} more skipped annotations", highlight=False)
    _print_labels(split["labels"])
    if split.get("targets") is not None:
        stdout.print(
            f"targets: {split['targets']['line']} ({split['targets']['source']}; train.min_iou decides "
            "which queries train)",
            highlight=False,
            soft_wrap=True,
        )
    if "arrays" not in split:
        return
    table = Table()
    for column in ("array", "shape", "dtype", "chunks", "bytes", "stored"):
        table.add_column(
            column, no_wrap=column in ("array", "shape"), justify="right" if column in ("bytes", "stored") else "left"
        )
    for a in split["arrays"]:
        table.add_row(
            a["path"],
            str(tuple(a["shape"])),
            a["dtype"],
            str(tuple(a["chunks"])),
            format_bytes(a["bytes"]),
            format_bytes(a["stored"]),
        )
    stdout.print(table)
    total = split["stored_bytes"]
    per = (
        f"{format_bytes(total / max(split['images'], 1))} per image ({split['views']} views)"
        if split.get("views", 1) > 1
        else f"{format_bytes(total / max(split['rows'], 1))} per image"
    )
    stdout.print(f"split {name}: {format_bytes(total)} on disk, {per}")


def _print_labels(labels: dict) -> None:
    """``labels (by name): ring -> ring (1), ...`` and the categories no label maps to."""
    if labels["mode"] == "class-agnostic":
        stdout.print(
            "labels (class-agnostic): every detection is a candidate, in one category "
            f"{labels['pairs'][0]['category']!r}; eval scores all categories as one",
            highlight=False,
        )
        return
    pairs = ", ".join(f"{p['label']} -> {p['category']} ({p['category_id']})" for p in labels["pairs"])
    dropped = f"; {len(labels['unmapped_labels'])} labels map to no category" if labels["unmapped_labels"] else ""
    stdout.print(f"labels ({labels['mode']}): {pairs}{dropped}", highlight=False, soft_wrap=True)
    if labels["unmapped_categories"]:
        never = ", ".join(
            c["name"] + ("" if c["instances"] is None else f" ({c['instances']} GT)")
            for c in labels["unmapped_categories"]
        )
        stdout.print(f"  categories no label maps to (never predicted): {never}", highlight=False, soft_wrap=True)
