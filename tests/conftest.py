import os

import tempfile

import pytest
import torch

# The user's record of exported C1 programs (mfcache.checkpoint_io) goes to a scratch folder,
# not the home of whoever runs the tests; subprocesses inherit it.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mfcache-test-state-")

# Under pytest-xdist each worker gets one thread, so `-n auto` uses the cores without oversubscribing.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A tiny shapes dataset shared by the end-to-end tests."""
    from mfcache.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_train=8, num_val=4, seed=3)
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 4 + 2 image shapes dataset (64-96 px) for the detector-family tests, made per module."""
    from mfcache.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_train=4, num_val=2, seed=5, min_size=64, max_size=96)
    return root
