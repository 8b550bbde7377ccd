"""Caches the tests build: every split of a shapes dataset extracted into one cache, and the small
settings the object-storage tests extract and train with (a folder and a bucket alike)."""

from pathlib import Path

from mfcache.config import ExtractConfig
from mfcache.stages.extract import extract

# small and quick: blocks of 2 images, so a few images make several blocks
STORE_CONFIG = ExtractConfig(
    topk=10, target_size=8, block_size=2, batch_size=2, num_workers=0, device="cpu", c1="store"
)
STORE_TRAIN = ["train.steps=2", "train.batch_size=2", "train.num_workers=0", "train.device=cpu", "head.roi_size=16"]


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
