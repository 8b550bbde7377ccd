"""Loading a checkpoint or a cache never runs code from it; outputs stay inside --out.

A malicious pickle (an object whose ``__reduce__`` calls ``os.system`` or ``open``) is put
where released and shared files carry extra objects: a native detector's ``args`` entry and
a run checkpoint. Its marker file must never appear, and the refusal is one line naming the
type the file asked for and the ``--trust-checkpoint`` option.
"""

import argparse
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import zarr

from mfcache.cache.c1_stem import STEM_ARRAY
from mfcache.cache.reader import Cache
from mfcache.cache.schema import checksum
from mfcache.checkpoint_io import load_checkpoint, trusting
from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.data.shapes import CATEGORIES
from mfcache.detectors import load_detector
from mfcache.errors import MfcacheError, UntrustedFile
from mfcache.stages.extract import extract
from mfcache.stages.runs import CHECKPOINT
from mfcache.stages.train import train
from tests.helpers.cli import invoke, one_error_line
from tests.helpers.native import HDETR_TINY, random_checkpoint, spec


class System:
    """Unpickling this runs a shell command (the attack of issue 21)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Open:
    """Unpickling this creates a file with the builtin ``open``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


PAYLOADS = {"os.system": (System, "posix.system"), "open": (Open, "io.open")}


@dataclass
class Settings:
    """A harmless type outside what mfcache allows: only --trust-checkpoint accepts it."""

    note: str = "from a trusted colleague"


def only_an_error_line(result, *needles):
    """:func:`one_error_line`, and nothing else printed: not a warning, not a wrapped line."""
    one_error_line(result, *needles)
    assert result.output.strip().count("\n") == 0, result.output


def hdetr_file(path, extra: dict, num_classes: int = 91) -> None:
    """A tiny H-DETR checkpoint with ``extra`` entries next to ``model``."""
    random_checkpoint(path, "hdetr", {**HDETR_TINY, "num_classes": num_classes})
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, **extra}, path)


# ----------------------------------------------------------------------------- native .pth
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_malicious_native_checkpoint_never_runs(tmp_path, payload):
    cls, asked = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    hdetr_file(tmp_path / "evil.pth", {"args": cls(marker)})
    with pytest.raises(MfcacheError) as error:
        load_detector(spec("hdetr", tmp_path / "evil.pth", HDETR_TINY))
    message = str(error.value)
    assert "\n" not in message and f"asks for {asked}," in message
    assert "pass `trust_checkpoint=True`" in message  # the setting; the CLI names its flag (test below)
    assert isinstance(error.value, UntrustedFile)
    assert not marker.exists()


def test_a_malicious_native_checkpoint_given_to_extract_never_runs(shapes_data, tmp_path):
    marker = tmp_path / "pwned"
    hdetr_file(tmp_path / "evil.pth", {"args": System(marker)})
    result = invoke(
        "extract",
        "--detector",
        spec("hdetr", tmp_path / "evil.pth", HDETR_TINY),
        "--images",
        shapes_data / "train",
        "--annotations",
        shapes_data / "annotations" / "train.json",
        "--out",
        tmp_path / "cache",
        "--workers",
        0,
        "--device",
        "cpu",
        "-q",
    )
    only_an_error_line(result, "posix.system", "--trust-checkpoint")
    assert not marker.exists()


def released_extras(state: dict) -> dict:
    """What the H-DETR / DINO repos save next to ``model``: the optimizer and lr-scheduler
    state after some training, the epoch and the argparse arguments."""
    params = [torch.nn.Parameter(v.clone()) for v in list(state.values())[:3]]
    optimizer = torch.optim.AdamW(
        [{"params": params[:2], "lr": 2e-4}, {"params": params[2:], "lr": 2e-5}], weight_decay=1e-4
    )
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    multi_step = torch.optim.lr_scheduler.MultiStepLR(optimizer, [33, 45])  # DINO's multi_step_lr
    sum(p.sum() for p in params).backward()
    optimizer.step()
    for scheduler in (step_lr, multi_step):
        scheduler.step()
    args = argparse.Namespace(
        lr=2e-4,
        lr_backbone_names=["backbone.0"],
        lr_drop=40,
        lr_drop_epochs=None,
        backbone="resnet50",
        position_embedding_scale=2 * math.pi,
        two_stage=True,
        with_box_refine=True,
        num_queries_one2one=300,
        output_dir="exps/r50",
        device="cuda",
        resume="",
        start_epoch=0,
        distributed=True,
        dist_url="env://",
        gpu=0,
        rank=0,
        data_aug_scales=[480, 512, 544],
        dn_labelbook_size=91,
    )
    return {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": step_lr.state_dict(),
        "multi_step_lr": multi_step.state_dict(),
        "epoch": 11,
        "args": args,
        "ema_model": {k: v.clone() for k, v in state.items()},
    }


def test_a_checkpoint_built_like_the_released_ones_loads(tmp_path):
    path = tmp_path / "checkpoint0011.pth"
    random_checkpoint(path, "hdetr", HDETR_TINY)
    state = torch.load(path, weights_only=True)["model"]
    torch.save({"model": state, **released_extras(state)}, path)
    model = load_detector(spec("hdetr", path, HDETR_TINY))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_trust_checkpoint_accepts_another_type(shapes_data, tmp_path):
    path = tmp_path / "colleague.pth"
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["N/A", *CATEGORIES]))
    hdetr_file(path, {"args": Settings()}, num_classes=1 + len(CATEGORIES))
    detector = spec("hdetr", path, HDETR_TINY, labels=labels, shortest_edge=64, longest_edge=96)
    args = [
        "extract",
        "--detector",
        detector,
        "--images",
        shapes_data / "val",
        "--annotations",
        shapes_data / "annotations" / "val.json",
        "--out",
        tmp_path / "cache",
        "--workers",
        0,
        "--device",
        "cpu",
        "--topk",
        5,
        "-q",
    ]
    only_an_error_line(invoke(*args), "Settings", "--trust-checkpoint")
    result = invoke(*args, "--trust-checkpoint")
    assert result.exit_code == 0, result.output
    with trusting():
        assert load_detector(detector).info.family == "hdetr"


# ----------------------------------------------------------------------------- run checkpoints
@pytest.fixture(scope="module")
def run(shapes_data, tmp_path_factory):
    """A demo cache of the val split and a head trained 2 steps on it."""
    root = tmp_path_factory.mktemp("trust_run")
    assert (
        invoke(
            "extract",
            "--detector",
            "demo",
            "--images",
            shapes_data / "val",
            "--annotations",
            shapes_data / "annotations" / "val.json",
            "--out",
            root / "cache",
            "--workers",
            0,
            "--device",
            "cpu",
            "-q",
        ).exit_code
        == 0
    )
    result = invoke(
        "train",
        "--cache",
        root / "cache",
        "--out",
        root / "run",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.num_workers=0",
        "-q",
    )
    assert result.exit_code == 0, result.output
    return root


def test_own_run_checkpoints_hold_only_plain_data(run):
    path = run / "run" / CHECKPOINT
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)  # no allowance at all
    assert state["rng"].dtype == torch.uint8 and isinstance(state["config"], dict)


def tampered_run(run, tmp_path, extra) -> str:
    """A copy of the run folder whose checkpoint carries ``extra`` entries."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run / "run", copy)
    state = torch.load(copy / CHECKPOINT, weights_only=True)
    torch.save({**state, **extra}, copy / CHECKPOINT)
    return copy


def commands_reading_a_run(run, run_dir, shapes_data, tmp_path):
    image = sorted((shapes_data / "val").glob("*.png"))[0]
    return {
        "eval": ["eval", "--cache", run / "cache", "--run", run_dir, "--out", tmp_path / "m.json", "-q"],
        "train --resume": [
            "train",
            "--cache",
            run / "cache",
            "--out",
            run_dir,
            "--resume",
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.num_workers=0",
            "-q",
        ],
        "predict": ["predict", "--detector", "demo", "--run", run_dir, image, "--out", tmp_path / "pred", "-q"],
    }


@pytest.mark.parametrize("command", ["eval", "train --resume", "predict"])
def test_a_malicious_run_checkpoint_never_runs(run, shapes_data, tmp_path, command):
    marker = tmp_path / "pwned"
    run_dir = tampered_run(run, tmp_path, {"note": Open(marker)})
    args = commands_reading_a_run(run, run_dir, shapes_data, tmp_path)[command]
    only_an_error_line(invoke(*args), "run checkpoint", "asks for io.open,", "--trust-checkpoint")
    assert not marker.exists()


def test_trust_checkpoint_accepts_a_run_with_another_type(run, shapes_data, tmp_path):
    run_dir = tampered_run(run, tmp_path, {"note": Settings()})
    for command, args in commands_reading_a_run(run, run_dir, shapes_data, tmp_path).items():
        only_an_error_line(invoke(*args), "Settings")
        result = invoke(*args, "--trust-checkpoint")
        assert result.exit_code == 0, (command, result.output)


def test_an_unreadable_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(MfcacheError, match=r"^cannot read run checkpoint .*broken\.pt: \w+") as error:
        load_checkpoint(path, what="run checkpoint")
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- the C1 stem
def poison_stem(cache_path, marker) -> bytes:
    """Mark one weight of the cache's exported stem as pickled and replace its bytes by a
    pickle that creates ``marker`` (what torch.export.load does with it is the question);
    returns the new program."""
    source = zipfile.ZipFile(io.BytesIO(zarr.open_array(str(cache_path / STEM_ARRAY), mode="r")[:].tobytes()))
    files = {item.filename: source.read(item.filename) for item in source.infolist()}
    config_name = next(name for name in files if name.endswith("model_weights_config.json"))
    config = json.loads(files[config_name])
    weight = config["config"][sorted(config["config"])[0]]
    weight["use_pickle"] = True
    files[config_name] = json.dumps(config).encode()
    evil = io.BytesIO()
    torch.save(Open(marker), evil)
    files[f"{config_name.rsplit('/', 1)[0]}/{weight['path_name']}"] = evil.getvalue()
    program = io.BytesIO()
    with zipfile.ZipFile(program, "w") as out:
        for name, data in files.items():
            out.writestr(name, data)
    data = np.frombuffer(program.getvalue(), dtype=np.uint8)
    root = zarr.open_group(str(cache_path), mode="r+")
    stored = root.create_array(STEM_ARRAY, shape=data.shape, chunks=data.shape, dtype="uint8", overwrite=True)
    stored[:] = data
    stored.attrs["crc32"] = checksum(data)  # whoever edits a cache can also fix its checksum
    return program.getvalue()


def test_a_cache_s_stored_stem_runs_only_when_trusted(shapes_data, tmp_path):
    cache = tmp_path / "cache"
    extract(
        detector="demo",
        images=shapes_data / "val",
        annotations=shapes_data / "annotations" / "val.json",
        out=cache,
        config=ExtractConfig(c1="recompute", batch_size=1, num_workers=0, device="cpu"),
        progress=False,
    )
    marker = tmp_path / "pwned"
    program = poison_stem(cache, marker)
    config = resolve_run_config("box_baseline", ["train.steps=1", "train.batch_size=2", "train.num_workers=0"])

    result = invoke(
        "train",
        "--cache",
        cache,
        "--out",
        tmp_path / "run",
        "--head",
        "box_baseline",
        "--set",
        "train.steps=1",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.num_workers=0",
        "-q",
    )
    only_an_error_line(result, "recomputes C1", "--trust-checkpoint")
    assert not marker.exists() and not (tmp_path / "run" / CHECKPOINT).exists()
    with pytest.raises(MfcacheError, match="recomputes C1"):
        train(cache_path=cache, run_dir=tmp_path / "run2", config=config, progress=False)
    assert not marker.exists()

    # why: torch.export.load unpickles such a weight with the full unpickler (the payload runs,
    # then the program is found broken: too late)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch says after the fact
        torch.export.load(io.BytesIO(program))
    assert marker.exists()


def test_a_stem_this_user_exported_runs_without_trust_and_nobody_elses_does(shapes_data, tmp_path, monkeypatch):
    """The record of exported programs lives in the user's state folder, not in the cache:
    the same cache is trusted by the user who extracted it and refused for another user."""
    cache = tmp_path / "cache"
    extract(
        detector="demo",
        images=shapes_data / "val",
        annotations=shapes_data / "annotations" / "val.json",
        out=cache,
        config=ExtractConfig(c1="recompute", batch_size=1, num_workers=0, device="cpu"),
        progress=False,
    )
    split = Cache(cache).split("val")
    assert split.read(0, levels=(0,), targets=False).c1.ndim == 3  # made here: runs

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "another-user"))
    with pytest.raises(UntrustedFile, match="not exported by your own extraction.*trust_checkpoint=True"):
        Cache(cache).split("val").read(0, levels=(0,), targets=False)
    with trusting():
        assert Cache(cache).split("val").read(0, levels=(0,), targets=False).c1.ndim == 3


# ----------------------------------------------------------------------------- outputs
def test_predict_overlays_never_leave_out(run, shapes_data, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "pred"
    out.mkdir()
    (out / "overlays").symlink_to(outside, target_is_directory=True)
    image = sorted((shapes_data / "val").glob("*.png"))[0]
    result = invoke("predict", "--detector", "demo", "--run", run / "run", image, "--out", out, "-q")
    only_an_error_line(result, "outside", str(out))
    assert list(outside.iterdir()) == [] and not (out / "results.json").exists()


def test_eval_visualize_panels_never_leave_out(run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "visualize").symlink_to(outside, target_is_directory=True)
    result = invoke(
        "eval",
        "--cache",
        run / "cache",
        "--run",
        run / "run",
        "--out",
        tmp_path / "m" / "metrics.json",
        "--visualize",
        1,
        "-q",
    )
    only_an_error_line(result, "outside")
    assert list(outside.iterdir()) == []
