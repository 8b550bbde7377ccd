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


@pytest.fixture(scope="session")
def demo_layout(shapes_data, tmp_path_factory):
    """``mfcache demo``'s layout in a fresh folder, small (the Python API tests and the docs' runnable
    blocks run in it): mfcache-demo/data (2 val images),
    mfcache-demo/cache (their demo-detector outputs, detector batch 1) and mfcache-demo/run
    (a head trained 2 steps on it)."""
    import json
    import shutil

    from tests.helpers.cli import run_ok

    root = tmp_path_factory.mktemp("api")
    demo = root / "mfcache-demo"
    val = json.loads((shapes_data / "annotations" / "val.json").read_text())
    images = val["images"][:2]
    (demo / "data" / "val").mkdir(parents=True)
    (demo / "data" / "annotations").mkdir()
    for im in images:
        shutil.copy(shapes_data / "val" / im["file_name"], demo / "data" / "val" / im["file_name"])
    keep = {im["id"] for im in images}
    subset = {**val, "images": images, "annotations": [a for a in val["annotations"] if a["image_id"] in keep]}
    (demo / "data" / "annotations" / "val.json").write_text(json.dumps(subset))
    for args in (
        [
            "extract",
            "--detector",
            "demo",
            "--images",
            demo / "data" / "val",
            "--annotations",
            demo / "data" / "annotations" / "val.json",
            "--out",
            demo / "cache",
            "--batch-size",
            1,
            "--workers",
            0,
        ],
        [
            "train",
            "--cache",
            demo / "cache",
            "--split",
            "val",
            "--out",
            demo / "run",
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=2",
            "--set",
            "eval.batch_size=1",
        ],
    ):
        run_ok(*args, "-q")
    return root
