"""`mfcache sweep` / `mfcache heads`: many heads from one cache, never the detector."""

import json
import sys

import pytest

from mfcache.config import preset_names
from tests.helpers.cli import invoke


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    import functools

    import mfcache.stages.extract
    from mfcache.config import ExtractConfig
    from mfcache.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("sweep")
    data = write_shapes_dataset(root / "data", num_train=6, num_val=3, seed=5, min_size=64, max_size=96)
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as patch:  # build the demo detector once for both splits
        patch.setattr(mfcache.stages.extract, "load_detector", functools.cache(mfcache.stages.extract.load_detector))
        for split in ("train", "val"):
            mfcache.stages.extract.extract(
                detector="demo",
                images=data[f"{split}_images"],
                annotations=data[split],
                out=cache,
                config=ExtractConfig(num_workers=0, topk=20),
                progress=False,
            )
    return cache


def test_sweep_two_heads_without_the_detector(tiny_cache, tmp_path, monkeypatch):
    import mfcache.detectors

    def no_detector(*args, **kwargs):
        raise AssertionError("the sweep loaded a detector")

    monkeypatch.setattr(mfcache.detectors, "load_detector", no_detector)
    monkeypatch.delitem(sys.modules, "mfcache.detectors.hf", raising=False)
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--cache",
        str(tiny_cache),
        "--heads",
        "box_baseline",
        "--heads",
        "mask_scoring",
        "--steps",
        "2",
        "--set",
        "train.batch_size=2",
        "--out",
        str(out),
        "-q",
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "mfcache.detectors.hf" not in sys.modules
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in rows] == ["box_baseline", "mask_scoring"]
    for r in rows:
        assert set(r) >= {
            "name",
            "segm_AP",
            "segm_AP50",
            "segm_APs",
            "segm_APm",
            "segm_APl",
            "params",
            "train_seconds",
            "peak_memory_mb",
            "config",
        }
        assert r["segm_AP"] is None or 0.0 <= r["segm_AP"] <= 1.0
        assert r["params"] > 0 and r["train_seconds"] > 0 and r["peak_memory_mb"] > 0
        assert r["config"]["train"]["steps"] == 2
    assert rows[1]["params"] > rows[0]["params"]  # the mask-IoU branch adds parameters
    assert rows[1]["config"]["head"]["scoring"] == "mask_iou"
    md = (out / "sweep.md").read_text()
    assert "| box_baseline |" in md and "| mask_scoring |" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumable: finished heads are read back, not retrained
    mtime = (out / "box_baseline" / "checkpoint.pt").stat().st_mtime_ns
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert again.output.count("already done") == 2
    assert (out / "box_baseline" / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "sweep.json").read_text()) == rows


def test_sweep_unknown_head_is_one_line_error(tiny_cache, tmp_path):
    result = invoke("sweep", "--cache", tiny_cache, "--heads", "nope", "--out", tmp_path / "s")
    assert result.exit_code == 1
    assert "unknown head preset 'nope'" in result.output
    assert not (tmp_path / "s").exists()


def test_heads_lists_every_preset_with_its_size():
    result = invoke("heads", terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in preset_names():
        assert name in result.output
    assert "20,736" in result.output  # box baseline: query map 128x128 + 128, C1 map 32x128 + 128


@pytest.mark.parametrize("command", [["heads"], ["sweep"]])
def test_help_has_an_example(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Example: mfcache " + command[0] in " ".join(result.output.split())


def test_resident_peak_keeps_the_highest_resident_size_seen():
    import time

    import torch

    from mfcache.stages.sweep import ResidentPeak

    with ResidentPeak() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched so that it is resident
        while_alive = peak._sample()
        deadline = time.monotonic() + 10  # the watcher samples every 20 ms; a loaded machine may delay it
        while peak.peak_mb < while_alive and time.monotonic() < deadline:
            time.sleep(0.02)
        del block
        time.sleep(0.1)
    assert peak.peak_mb is not None and peak.peak_mb >= while_alive > 0


def test_resident_peak_does_not_count_memory_freed_before_it():
    import numpy as np

    from mfcache.stages.sweep import ResidentPeak

    base = ResidentPeak()._sample()
    blocks = [np.ones(100_000 // 8) for _ in range(2000)]  # 200 MB in pieces glibc keeps on its heap
    pin = np.ones(100_000 // 8)  # allocated last: the heap top cannot shrink on free()
    del blocks
    held = ResidentPeak()._sample()
    with ResidentPeak() as peak:
        pass
    assert held - base > 100  # freed but still resident...
    assert peak.peak_mb < held - 100  # ...and not part of the next measurement
    del pin


def test_sigterm_during_a_heads_eval_stops_before_the_next_head_and_the_sweep_resumes(
    tiny_cache, tmp_path, monkeypatch
):
    """A preemption between heads (here while the first head is evaluated): that head's row and
    the table are written, the sweep stops with one line and status 143, and the same command
    finishes the rest."""
    import os
    import signal

    import mfcache.stages.sweep as sweeping

    evaluate = sweeping.evaluate

    def preempted_once(**kwargs):
        monkeypatch.setattr(sweeping, "evaluate", evaluate)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded: this evaluation still finishes
        return evaluate(**kwargs)

    monkeypatch.setattr(sweeping, "evaluate", preempted_once)
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--cache",
        str(tiny_cache),
        "--heads",
        "box_baseline",
        "--heads",
        "blendmask",
        "--steps",
        "1",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.num_workers=0",
        "--out",
        str(out),
        "-q",
    ]
    stopped = invoke(*args)
    assert stopped.exit_code == 143, stopped.output
    assert stopped.output.splitlines()[-1] == (
        "interrupted: SIGTERM after 1 of 2 heads; work finished so far is kept; run the same command again to resume"
    )
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())] == ["box_baseline"]
    assert not (out / "blendmask").exists()

    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert again.output.count("already done") == 1
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())] == ["box_baseline", "blendmask"]
