"""Killing `mfcache extract` with SIGKILL at any point and re-running the same command gives
exactly the cache an uninterrupted run writes, array by array."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.verify import verify
from mfcache.config import ExtractConfig
from mfcache.data.shapes import write_shapes_dataset
from mfcache.stages.extract import extract
from tests.helpers.processes import group_gone

BLOCK = 3
# The real command, with each block write slowed down (before its data, and between its
# regular and ragged arrays) so that the test can kill it at chosen moments.
CHILD = """
import sys, time
from mfcache.cache import writer
write, ragged = writer.BlockWriter.write, writer.BlockWriter._write_ragged
writer.BlockWriter.write = lambda self, *a, **k: (time.sleep(0.3), write(self, *a, **k))[1]
writer.BlockWriter._write_ragged = lambda self, *a, **k: (time.sleep(0.3), ragged(self, *a, **k))[1]
from mfcache.cli.main import main
sys.argv = ["mfcache", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_shapes_dataset(root, num_train=12, num_val=0, seed=5, min_size=64, max_size=80)
    return root


def args(data, out):
    return [
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
    ]


def config():
    # C1 stored: its ragged array is among the arrays a resumed run must write exactly as an uninterrupted one
    return ExtractConfig(
        topk=10, target_size=8, block_size=BLOCK, batch_size=2, num_workers=0, device="cpu", c1="store"
    )


def done_flags(out):
    try:
        return zarr.open_array(out / "train" / "index" / "done", mode="r")[:]
    except Exception:  # not created yet
        return None


def kill_when(data, out, condition, delay=0.0):
    # the same thread count as the in-process reference run: float sums differ across counts
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args(data, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    deadline = time.monotonic() + 120
    while not condition(done_flags(out)):
        assert proc.poll() is None, f"extract ended before the kill point: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return done_flags(out)


def assert_same_cache(a, b):
    ga, gb = zarr.open_group(a / "train", mode="r"), zarr.open_group(b / "train", mode="r")
    arrays_a = {p: n for p, n in ga.members(max_depth=None) if isinstance(n, zarr.Array)}
    arrays_b = {p: n for p, n in gb.members(max_depth=None) if isinstance(n, zarr.Array)}
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, array in arrays_a.items():
        assert array.dtype == arrays_b[name].dtype and array.chunks == arrays_b[name].chunks, name
        np.testing.assert_array_equal(array[:], arrays_b[name][:], err_msg=name)
    assert dict(ga.attrs) == dict(gb.attrs)
    assert zarr.open_group(a, mode="r").attrs["mfcache"] == zarr.open_group(b, mode="r").attrs["mfcache"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "cache"
    extract(
        detector="demo",
        images=data / "train",
        annotations=data / "annotations" / "train.json",
        out=out,
        config=config(),
        progress=False,
    )
    return out


KILL_POINTS = {
    "layout created": (lambda d: d is not None, 0.0),
    "after one block": (lambda d: d is not None and d.sum() >= BLOCK, 0.0),
    "inside a block write": (lambda d: d is not None and d.sum() >= 2 * BLOCK, 0.45),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_and_rerun_equals_uninterrupted(point, data, reference, tmp_path):
    out = tmp_path / "cache"
    condition, delay = KILL_POINTS[point]
    flags = kill_when(data, out, condition, delay)
    assert flags is not None and 0 <= int((flags == 1).sum()) < 12, "the kill came too late to test anything"
    # whatever the kill left reads as not done, never as done with partial data
    assert int((flags == 1).sum()) % BLOCK == 0
    leftover = out / "train" / "memory" / "c" / "0.0123abcd.partial"  # what a write killed midway leaves
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a shard")
    summary = extract(
        detector="demo",
        images=data / "train",
        annotations=data / "annotations" / "train.json",
        out=out,
        config=config(),
        progress=False,
    )
    assert summary.written == 12 - int((flags == 1).sum())
    assert_same_cache(out, reference)
    assert verify(out).ok and not list(out.rglob("*.partial"))


# The real command with each detector batch slowed down, so a signal lands mid-run.
SLOW_BATCHES = """
import sys, time
from mfcache.stages import extract as extraction
run_detector = extraction.run_detector
extraction.run_detector = lambda *a, **k: (time.sleep(0.3), run_detector(*a, **k))[1]
from mfcache.cli.main import main
sys.argv = ["mfcache", *sys.argv[1:]]
main()
"""


def test_sigterm_to_the_process_group_keeps_finished_blocks_and_the_same_command_resumes(data, reference, tmp_path):
    """scancel / a pod eviction: SIGTERM to the command and its 2 loader workers at once. It
    stops after the batch in progress with one line and status 143, no worker is left, and the
    same command again completes the cache an uninterrupted run writes."""
    out = tmp_path / "cache"
    command = [sys.executable, "-c", SLOW_BATCHES, *args(data, out)]
    command[command.index("--workers") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "COLUMNS": "300"}
    proc = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while not ((flags := done_flags(out)) is not None and flags.sum() >= BLOCK):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "extract never finished a block"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "DataLoader worker" not in err and len(err.strip().splitlines()) == 1, err
    cached = int((done_flags(out) == 1).sum())
    assert BLOCK <= cached < 12 and cached % BLOCK == 0, "the signal came too late to test anything"
    assert " ".join(err.split()) == (
        f"interrupted: SIGTERM with {cached} of 12 images cached; finished blocks are "
        "kept; run the same command again to resume"
    )
    assert group_gone(proc.pid), "a loader worker outlived the command"

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert again.returncode == 0, again.stderr
    assert f"({12 - cached} written now)" in " ".join(again.stdout.split())
    assert_same_cache(out, reference)


def test_records_built_on_the_writer_thread_equal_in_line(data, reference, tmp_path, monkeypatch):
    from mfcache.stages import extract as extract_module

    monkeypatch.setattr(extract_module, "records_on_writer_thread", lambda device: True)  # the GPU path
    out = tmp_path / "cache"
    extract(
        detector="demo",
        images=data / "train",
        annotations=data / "annotations" / "train.json",
        out=out,
        config=config(),
        progress=False,
    )
    assert_same_cache(out, reference)


# --- training: a non-finite loss stops cleanly; --resume continues the exact loss curve ---

import json  # noqa: E402

from mfcache.config import resolve_run_config  # noqa: E402
from mfcache.errors import MfcacheError  # noqa: E402
from mfcache.stages import train as training  # noqa: E402


def run_config():
    return resolve_run_config(
        None,
        [
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.log_every=1",
            "train.batch_size=2",
            "train.num_workers=0",
            "train.device=cpu",
            "train.min_iou=0.1",
        ],
    )


def losses(run):
    return [(e["step"], e["loss"]) for e in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def fail_at(monkeypatch, call, error):
    calls, original = [], training.head_loss

    def patched(*args, **kwargs):
        calls.append(1)
        loss, parts = original(*args, **kwargs)
        if len(calls) == call:
            if isinstance(error, BaseException):
                raise error
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(training, "head_loss", patched)


def test_resume_reproduces_the_loss_curve(train_cache, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    training.train(cache_path=train_cache, run_dir=full, config=run_config(), progress=False)
    fail_at(monkeypatch, 4, KeyboardInterrupt())  # killed during step 4, after the step-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        training.train(cache_path=train_cache, run_dir=part, config=run_config(), progress=False)
    monkeypatch.undo()
    assert [s for s, _ in losses(part)] == [1, 2, 3]
    training.train(cache_path=train_cache, run_dir=part, config=run_config(), resume=True, progress=False)
    assert losses(part) == losses(full) and len(losses(full)) == 6
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(train_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fail_at(monkeypatch, 5, "nan")
    with pytest.raises(MfcacheError, match="loss became non-finite .* at step 5.*last good checkpoint"):
        training.train(cache_path=train_cache, run_dir=run, config=run_config(), progress=False)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
