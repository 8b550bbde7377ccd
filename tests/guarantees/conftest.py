"""Fixtures shared by the guarantee tests."""

import pytest

from mfcache.config import ExtractConfig
from mfcache.stages.extract import extract


@pytest.fixture(scope="module")
def train_cache(shapes_data, tmp_path_factory):
    """The shapes train split extracted by the demo detector (top 10, 16 px targets, blocks of 4):
    what the resume and interrupt tests train on."""
    out = tmp_path_factory.mktemp("train") / "cache"
    extract(
        detector="demo",
        images=shapes_data / "train",
        annotations=shapes_data / "annotations" / "train.json",
        out=out,
        config=ExtractConfig(topk=10, target_size=16, block_size=4, num_workers=0, device="cpu"),
        progress=False,
    )
    return out
