"""torchrun on CPU (gloo, 2 processes): extraction shares whole blocks between ranks and
writes exactly the cache of a one-process run; DDP training over slices of each global
batch ends with the weights of a one-process run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.verify import verify
from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.data.shapes import write_shapes_dataset
from mfcache.stages import train as training
from mfcache.stages.extract import extract

BLOCK = 3


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # one image size: collated batches then pad alike whether a rank holds the whole batch or a slice
    root = tmp_path_factory.mktemp("dist")
    write_shapes_dataset(root, num_train=12, num_val=0, seed=7, min_size=72, max_size=72)
    return root


@pytest.fixture(scope="module")
def reference(data):
    out = data / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes (OMP_NUM_THREADS=1): the same float sums
    extract(
        detector="demo",
        images=data / "train",
        annotations=data / "annotations" / "train.json",
        out=out,
        config=ExtractConfig(
            topk=10, target_size=8, block_size=BLOCK, batch_size=2, num_workers=0, device="cpu", c1="store"
        ),
        progress=False,
    )  # ranks write the ragged c1 too
    torch.set_num_threads(threads)
    return out


def arrays(path: Path) -> dict:
    group = zarr.open_group(path / "train", mode="r")
    return {p: n for p, n in group.members(max_depth=None) if isinstance(n, zarr.Array)}


def test_two_rank_extract_equals_one_process(data, reference, tmp_path):
    out = tmp_path / "cache"
    # `torchrun -m mfcache extract ...`, the form docs/commands/index.md documents
    proc = torchrun(
        "-m",
        "mfcache",
        "extract",
        "--detector",
        "demo",
        "--images",
        str(data / "train"),
        "--annotations",
        str(data / "annotations" / "train.json"),
        "--out",
        str(out),
        "--workers",
        "0",
        "--topk",
        "10",
        "--target-size",
        "8",
        "--block-size",
        str(BLOCK),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--c1",
        "store",
        "-q",
    )
    said = " ".join(proc.stdout.split())  # the summary is a result: stdout
    assert said.count("12 images cached") == 1 and "(12 written now)" in said  # rank 0 reports both ranks' work
    ours, theirs = arrays(out), arrays(reference)
    assert sorted(ours) == sorted(theirs)
    for name, array in theirs.items():
        assert ours[name].chunks == array.chunks, name
        np.testing.assert_array_equal(ours[name][:], array[:], err_msg=name)
    assert dict(zarr.open_group(out / "train").attrs) == dict(zarr.open_group(reference / "train").attrs)
    assert verify(out).ok


def test_two_rank_ddp_training_equals_one_process(data, reference, tmp_path):
    settings = [
        "train.steps=3",
        "train.batch_size=4",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.num_workers=0",
        "train.device=cpu",
        "train.min_iou=0.1",
        "train.grad_clip=0",
    ]
    training.train(
        cache_path=reference, run_dir=tmp_path / "one", config=resolve_run_config(None, settings), progress=False
    )
    # `torchrun -m mfcache train ...`, the form docs/commands/index.md documents
    proc = torchrun(
        "-m",
        "mfcache",
        "train",
        "--cache",
        str(reference),
        "--out",
        str(tmp_path / "two"),
        "-q",
        *[a for s in settings for a in ("--set", s)],
    )
    assert proc.stdout.count("trained box_baseline to step 3") == 1  # rank 0 reports for all
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert two["step"] == 3 and two["config"] == one["config"]
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    log_one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    log_two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log_two] == [1, 2, 3]  # written once, by rank 0
    for a, b in zip(log_one, log_two):
        assert a["positives"] == b["positives"] > 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_a_setup_error_on_rank_0_ends_every_rank_with_the_same_line(data, reference, tmp_path):
    """Rank 0 alone opens an existing cache, and refuses it (made with another --topk) while
    rank 1 waits for the layout: both ranks end at once, each with the same one-line error,
    instead of rank 1 waiting at a barrier until the job's time runs out."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mfcache",
        "extract",
        "--detector",
        "demo",
        "--images",
        str(data / "train"),
        "--annotations",
        str(data / "annotations" / "train.json"),
        "--out",
        str(out),
        "--workers",
        "0",
        "--topk",
        "5",
        "--target-size",
        "8",
        "--block-size",
        str(BLOCK),
        "--device",
        "cpu",
        "-q",
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,  # hanging ranks fail here
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"},
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-4000:]  # one line from each rank
    assert "topk" in errors[0], errors[0]
    assert "Traceback" not in "".join(line for line in proc.stderr.splitlines() if "[rank" in line), proc.stderr[-4000:]
