import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A tiny shapes dataset shared by the end-to-end tests."""
    from mfcache.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_train=8, num_val=4, seed=3)
    return root
