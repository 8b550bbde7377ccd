"""What a cache holds, as plain data (``mfcache inspect`` renders it; JSON-ready).

:func:`describe` gathers the fingerprint (detector, preprocessing, extract settings), and per
split the image counts, the skipped images and annotations with their reasons, the GT match
stats (:mod:`mfcache.cache.stats`) and every array's shape, dtype, chunks and bytes.
"""

from __future__ import annotations

from pathlib import Path

import zarr

from mfcache.cache.reader import Cache, CacheSplit
from mfcache.cache.stats import group_stats, stored_stats
from mfcache.data.labels import describe_labels
from mfcache.errors import MfcacheError


def describe(cache_path: str | Path) -> dict:
    """The description of the cache at ``cache_path``::

        {"path", "schema_version", "mfcache_version",
         "detector": DetectorInfo.to_dict() (with "preprocess"),
         "extract": the fingerprint's extract settings, as stored,
         "splits": [split_report(...), ...],
         "error": ...}

    A cache that cannot be opened raises :class:`MfcacheError`. Damage found while
    describing a split (unreadable metadata) stops the description there: ``error`` holds
    its one-line message, and ``splits`` what was gathered before it (the last split's entry
    may lack ``targets`` and ``arrays``). Without damage there is no ``error`` key."""
    cache = Cache(cache_path)
    report = {
        "path": str(cache.path),
        "schema_version": cache.fingerprint["schema_version"],
        "mfcache_version": cache.fingerprint["mfcache_version"],
        "detector": cache.detector.to_dict(),
        "extract": dict(cache.fingerprint["extract"]),
        "splits": [],
    }
    for name in cache.splits:
        try:
            _describe_split(cache, name, report["splits"])
        except MfcacheError as exc:
            report["error"] = str(exc)
            break
    return report


def _describe_split(cache: Cache, name: str, into: list[dict]) -> None:
    """Append split ``name``'s entry to ``into`` as soon as it exists, then complete it, so
    that damage found on the way leaves what was gathered before it::

        {"name", "rows" (images x views), "views", "images", "complete" (images),
         "annotation_file", "annotations_sha256",
         "skipped_images": [{"id", "reason"}], "skipped_annotations": [{"id", "reason"}],
         "labels": mfcache.data.labels.describe_labels(...) (detector label -> category),
         "targets": None or {"stats": MatchStats.to_dict(), "line", "source"},
         "arrays": [{"path", "shape", "dtype", "chunks", "bytes", "stored"}], "stored_bytes"}

    ``targets.source`` says whether extraction recorded the stats or they were computed now
    (an older cache, or an unfinished split); None when neither is possible."""
    split = cache.split(name)
    entry = {
        "name": name,
        "rows": split.num_rows,  # images x views
        "views": cache.settings.views,
        "images": split.num_rows // cache.settings.views,
        "complete": len(split.complete_rows),  # images (every view written)
        "annotation_file": split.attrs["annotation_file"],
        "annotations_sha256": split.attrs["annotations_sha256"],
        "skipped_images": [{"id": i, "reason": r} for i, r in sorted(split.skipped.items())],
        "skipped_annotations": [{"id": i, "reason": r} for i, r in sorted(split.skipped_annotations.items())],
        "labels": describe_labels(cache.detector.label_names, split.attrs, cache.settings.label_map),
    }
    into.append(entry)
    entry["targets"] = _targets(split, entry["complete"])
    entry["arrays"] = _arrays(split)
    entry["stored_bytes"] = sum(a["stored"] for a in entry["arrays"])


def _targets(split: CacheSplit, done: int) -> dict | None:
    """The split's GT match stats: recorded at extraction, else computed over its complete images."""
    match, source = stored_stats(split.group), "recorded at extraction"
    if match is None and done:  # a cache written before extraction recorded it, or an unfinished split
        match = group_stats(split.group, views=split.cache.settings.views)
        source = f"computed now over the {done} complete images"
    if match is None:
        return None
    return {"stats": match.to_dict(), "line": match.line(), "source": source}


def _arrays(split: CacheSplit) -> list[dict]:
    """Every array of the split (sorted by path): shape, dtype, chunks, bytes and bytes stored."""
    try:
        members = sorted(split.group.members(max_depth=None))
    except Exception as exc:  # zarr raises many types for a metadata file that does not parse
        path = split.cache.path
        raise MfcacheError(
            f"split {split.name!r} of {path}: unreadable array metadata ({type(exc).__name__}: "
            f"{exc}): the cache is damaged (mfcache verify {path} lists all damage)"
        ) from None
    return [
        {
            "path": path,
            "shape": list(node.shape),
            "dtype": str(node.dtype),
            "chunks": list(node.chunks),
            "bytes": node.nbytes,
            "stored": node.nbytes_stored(),
        }
        for path, node in members
        if isinstance(node, zarr.Array)
    ]
