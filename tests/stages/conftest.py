"""Fixtures the stage tests share."""

import pytest

from mfcache.config import ExtractConfig
from tests.helpers.caches import extract_splits


@pytest.fixture(scope="module")
def cache(shapes_data, tmp_path_factory):
    """A cache of the shapes data's train (8 images: one batch of 8 is the whole split) and val (4)
    images, top-10 detections, C1 stored (recomputing it costs a validation more than the head does)."""
    config = ExtractConfig(topk=10, target_size=16, num_workers=0, device="cpu", c1="store")
    return extract_splits(shapes_data, tmp_path_factory.mktemp("stages") / "cache", config)
