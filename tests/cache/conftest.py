"""Fixtures the cache tests share."""

import pytest

from mfcache.data.shapes import write_shapes_dataset


@pytest.fixture(scope="module")
def store_data(tmp_path_factory):
    """A 6 train + 3 val shapes dataset (64-96 px) in ``ROOT/d``; returns ROOT (the object-storage
    tests put their folder caches beside it)."""
    root = tmp_path_factory.mktemp("store")
    write_shapes_dataset(root / "d", num_train=6, num_val=3, seed=2, min_size=64, max_size=96)
    return root
