"""Caches the tests build: every split of a shapes dataset extracted into one cache."""

from pathlib import Path

from mfcache.config import ExtractConfig
from mfcache.stages.extract import extract


def extract_splits(data: Path, out, config: ExtractConfig, splits=("train", "val")):
    """``data``'s ``splits`` (``data/<split>`` images, ``data/annotations/<split>.json``) extracted
    by the demo detector into the cache ``out`` (a folder or a URL); returns ``out``."""
    for split in splits:
        extract(
            detector="demo",
            images=data / split,
            annotations=data / "annotations" / f"{split}.json",
            out=out,
            config=config,
            progress=False,
        )
    return out
