"""Filesystem mistakes end in one `error:` line, found before the long work where they can be:
an --out that names a file (or, for metrics, a folder), a read-only folder, a full disk."""

import errno
import io
import os
from pathlib import Path

import pytest
import torch

from mfcache.config import ExtractConfig
from mfcache.stages import evaluate as evaluation
from mfcache.stages import train as training
from mfcache.stages.extract import extract
from tests.helpers.cli import invoke, one_error_line

FAST = ["--set", "train.batch_size=2", "--set", "train.num_workers=0", "--set", "train.device=cpu"]


@pytest.fixture(scope="module")
def cache(shapes_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fs")
    for split in ("train", "val"):
        extract(
            detector="demo",
            images=shapes_data / split,
            annotations=shapes_data / "annotations" / f"{split}.json",
            out=root / "cache",
            config=ExtractConfig(
                topk=10, target_size=16, num_workers=0, device="cpu", c1="store"
            ),  # the plan's c1 term is checked
            progress=False,
        )
    result = invoke("train", "--cache", root / "cache", "--out", root / "run", "--set", "train.steps=1", *FAST, "-q")
    assert result.exit_code == 0, result.output
    return root


def forbid(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran: the mistake was not found before the work")

    monkeypatch.setattr(module, name, fail)


def _inside(path, folder: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder.absolute())
    except TypeError:  # a file descriptor
        return False


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: by its mode bits and, since root passes every permission
    check, by refusing (EROFS, as a read-only mount does) every creation under it at the
    OS-call level that Python, zarr and torch's Python paths go through."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def patched_open(file, mode="r", *args, **kwargs):
        if _inside(file, folder) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def patched_os_open(path, flags, *args, **kwargs):
        if _inside(path, folder) and flags & WRITE_FLAGS:
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def patched_mkdir(path, *args, **kwargs):
        if _inside(path, folder):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", patched_open)
    monkeypatch.setattr("builtins.open", patched_open)
    monkeypatch.setattr(os, "open", patched_os_open)
    monkeypatch.setattr(os, "mkdir", patched_mkdir)


@pytest.fixture
def restore_modes():
    """Folders made read-only by a test, made writable again afterwards (for cleanup)."""
    folders = []
    yield folders
    for f in folders:
        f.chmod(0o755)


class FullFile:
    """A file whose every write fails with ENOSPC, as on a full disk."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def full_disk(monkeypatch, when):
    """From the moment ``when(path)`` is true for a file opened for writing, its writes fail."""
    real_open = io.open

    def patched_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullFile(handle) if any(c in mode for c in "wa+") and when(Path(os.fsdecode(file))) else handle

    monkeypatch.setattr(io, "open", patched_open)
    monkeypatch.setattr("builtins.open", patched_open)


# --- an --out that names a file (or, for eval, a folder) ---


def test_train_out_naming_a_file(cache, tmp_path):
    (tmp_path / "taken").write_text("x")
    one_error_line(
        invoke("train", "--cache", cache / "cache", "--out", tmp_path / "taken", "--set", "train.steps=1", *FAST, "-q"),
        "--out",
        "is a file",
    )


def test_predict_out_naming_a_file(cache, shapes_data, tmp_path, monkeypatch):
    import mfcache.stages.predict

    forbid(monkeypatch, mfcache.stages.predict, "load_detector")
    (tmp_path / "taken").write_text("x")
    image = sorted((shapes_data / "val").glob("*.png"))[0]
    one_error_line(
        invoke("predict", "--detector", "demo", "--run", cache / "run", image, "--out", tmp_path / "taken", "-q"),
        "--out",
        "is a file",
    )


def test_sweep_out_naming_a_file(cache, tmp_path, monkeypatch):
    import mfcache.stages.sweep

    forbid(monkeypatch, mfcache.stages.sweep, "train")
    (tmp_path / "taken").write_text("x")
    one_error_line(
        invoke(
            "sweep",
            "--cache",
            cache / "cache",
            "--heads",
            "box_baseline",
            "--steps",
            1,
            "--out",
            tmp_path / "taken",
            "-q",
        ),
        "--out",
        "is a file",
    )


def test_eval_out_naming_a_folder_fails_before_evaluating(cache, tmp_path, monkeypatch):
    forbid(monkeypatch, evaluation, "predict_split")
    (tmp_path / "metrics").mkdir()
    one_error_line(
        invoke("eval", "--cache", cache / "cache", "--run", cache / "run", "--out", tmp_path / "metrics", "-q"),
        "is a folder",
    )


# --- read-only folders ---


def test_a_new_cache_in_a_read_only_folder(shapes_data, tmp_path, monkeypatch, restore_modes):
    import mfcache.stages.extract

    forbid(monkeypatch, mfcache.stages.extract, "load_detector")
    restore_modes.append(tmp_path / "ro")
    read_only(monkeypatch, tmp_path / "ro")
    one_error_line(
        invoke(
            "extract",
            "--detector",
            "demo",
            "--images",
            shapes_data / "val",
            "--annotations",
            shapes_data / "annotations" / "val.json",
            "--out",
            tmp_path / "ro" / "cache",
            "--workers",
            0,
            "-q",
        ),
        "cannot write",
        "read-only",
    )
    assert not (tmp_path / "ro" / "cache").exists()


def test_metrics_in_a_read_only_folder_fail_before_evaluating(cache, tmp_path, monkeypatch, restore_modes):
    forbid(monkeypatch, evaluation, "predict_split")
    restore_modes.append(tmp_path / "ro")
    read_only(monkeypatch, tmp_path / "ro")
    one_error_line(
        invoke(
            "eval", "--cache", cache / "cache", "--run", cache / "run", "--out", tmp_path / "ro" / "metrics.json", "-q"
        ),
        "cannot write",
        "read-only",
    )


def test_a_run_in_a_read_only_folder(cache, tmp_path, monkeypatch, restore_modes):
    forbid(monkeypatch, training, "Cache")
    restore_modes.append(tmp_path / "ro")
    read_only(monkeypatch, tmp_path / "ro")
    one_error_line(
        invoke(
            "train", "--cache", cache / "cache", "--out", tmp_path / "ro" / "run", "--set", "train.steps=1", *FAST, "-q"
        ),
        "cannot write",
        "read-only",
    )


# --- a full disk ---


def test_disk_full_while_training_keeps_the_last_checkpoint(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # the disk fills up once the first checkpoint (step 2) is written
    full_disk(monkeypatch, lambda path: path.is_relative_to(run) and (run / "checkpoint.pt").exists())
    result = invoke(
        "train",
        "--cache",
        cache / "cache",
        "--out",
        run,
        "--set",
        "train.steps=6",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.log_every=1",
        *FAST,
        "-q",
    )
    one_error_line(result, "disk full")
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not list(run.glob("*.tmp"))


def test_disk_full_while_saving_a_checkpoint(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    full_disk(
        monkeypatch,
        lambda path: path.is_relative_to(run) and path.suffix == ".tmp" and (run / "checkpoint.pt").exists(),
    )
    result = invoke(
        "train",
        "--cache",
        cache / "cache",
        "--out",
        run,
        "--set",
        "train.steps=4",
        "--set",
        "train.checkpoint_every=2",
        *FAST,
        "-q",
    )
    one_error_line(result, "checkpoint", "disk full")
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not list(run.glob("*.tmp"))


def test_disk_full_while_writing_metrics(cache, tmp_path, monkeypatch):
    out = tmp_path / "m" / "metrics.json"
    full_disk(monkeypatch, lambda path: path.is_relative_to(tmp_path / "m"))
    one_error_line(
        invoke("eval", "--cache", cache / "cache", "--run", cache / "run", "--out", out, "-q"), "metrics", "disk full"
    )
    assert not out.exists() and not list((tmp_path / "m").glob("*.tmp"))


# --- the storage plan: printed before the first batch, refused when the disk cannot hold it ---


def test_extract_refuses_a_plan_larger_than_the_free_space(shapes_data, tmp_path, monkeypatch):
    from collections import namedtuple

    import mfcache.stages.extract

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mfcache.stages.extract.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    forbid(monkeypatch, mfcache.stages.extract, "_run_detector")  # refused before the first batch
    args = [
        "extract",
        "--detector",
        "demo",
        "--images",
        shapes_data / "val",
        "--annotations",
        shapes_data / "annotations" / "val.json",
        "--out",
        tmp_path / "cache",
        "--workers",
        0,
        "-q",
    ]
    one_error_line(invoke(*args), "needs", "4.9 KiB free", "--ignore-free-space")
    # nothing of the plan was written: only the layout (metadata, the planned index, the annotations)
    # and the lock file; no image's data, no done flag, and not the C1 program --c1 auto would export
    chunks = [p.relative_to(tmp_path / "cache").parts for p in (tmp_path / "cache").rglob("c/*")]
    written = {parts[: parts.index("c")] for parts in chunks}  # the arrays that hold a chunk
    assert written <= {
        ("val", "annotations"),
        *{("val", "index", n) for n in ("image_id", "orig_hw", "input_hw", "level_hw", "token_offset", "c1_offset")},
    }, written
    assert not (tmp_path / "cache" / "c1_stem").exists()
    monkeypatch.undo()
    monkeypatch.setattr(mfcache.stages.extract.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    result = invoke(*args[:-1], "--ignore-free-space")
    assert result.exit_code == 0, result.output
    assert "plan for split 'val' (C1 recomputed from the images, --c1 auto): 4 images" in " ".join(
        result.output.split()
    )


def test_the_storage_plan_matches_what_is_written(cache):
    from mfcache.cache.reader import Cache
    from mfcache.cache.schema import ExtractSettings, plan_split, storage_plan

    c = Cache(cache / "cache")
    settings = ExtractSettings.from_fingerprint(c.fingerprint)
    for name in c.splits:
        split = c.split(name)
        plan = plan_split(split.index["image_id"], split.index["orig_hw"], c.detector, 0, list(settings.levels))
        planned = storage_plan(
            plan,
            topk=settings.topk,
            d_model=c.detector.d_model,
            target_size=settings.target_size,
            c1_channels=c.detector.c1_channels if settings.c1 == "store" else 0,
            dtype=settings.dtype,
        ).total()
        stored = sum(
            node.nbytes_stored()
            for _, node in split.group.members(max_depth=None)
            if hasattr(node, "nbytes_stored") and not _.startswith(("index/", "annotations"))
        )
        assert abs(planned - stored) < 0.03 * stored, (name, planned, stored)
