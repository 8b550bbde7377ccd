"""Training you can watch: the resolved settings printed at the start, periodic validation
(`train.eval_every`) with the best head kept as best.pt, TensorBoard scalars, and `--steps` /
`--device` on `train` and `sweep`."""

import json
import sys

import pytest
import torch

from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.stages import train as training
from tests.helpers.cli import invoke, run_ok

SETTINGS = ["train.batch_size=2", "train.num_workers=0", "train.device=cpu", "train.min_iou=0.1", "head.roi_size=16"]


def config(*extra):
    return resolve_run_config(None, [*SETTINGS, *extra])


def log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_settings_printed_at_start_and_steps_device_take_effect(cache, tmp_path):
    run = tmp_path / "run"
    result = run_ok(
        "train",
        "--cache",
        cache,
        "--out",
        run,
        "--steps",
        "2",
        "--device",
        "cpu",
        *[a for s in SETTINGS if not s.startswith("train.device") for a in ("--set", s)],
    )
    stored = json.loads((run / "config.json").read_text())["config"]
    assert stored["train"]["steps"] == 2 and stored["train"]["device"] == "cpu"
    assert [e["step"] for e in log(run)][-1] == 2
    lines = result.stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("training box_baseline: "))
    assert f"cache {cache}, split train (8 images), run {run}" in lines[at]
    assert lines[at + 1].startswith("  cpu, 2 steps, batch 2, lr 0.00015, amp off, no periodic validation")
    assert lines[at + 2] == "  head: roi_size=16"  # the settings that differ from the defaults
    assert lines[at + 3] == "  train: min_iou=0.1, num_workers=0"
    assert lines[at + 4] == "  eval: defaults"
    assert lines[at + 5] == f"  full configuration: {run / 'config.json'}"
    plain = run_ok("train", "--cache", cache, "--out", tmp_path / "plain", "--steps", "1", "--device", "cpu").stderr
    assert "  train: the rest at defaults" in plain.splitlines()  # not "defaults": --steps / --device are set
    # before the training's progress; -q prints none of it
    progress = [i for i, line in enumerate(lines) if line.startswith("train: ")]
    assert progress and min(progress) > at + 5
    quiet = run_ok(
        "train",
        "--cache",
        cache,
        "--out",
        tmp_path / "quiet",
        "--steps",
        "1",
        "-q",
        *[a for s in SETTINGS for a in ("--set", s)],
    )
    assert "training box_baseline" not in quiet.output
    # --steps extends a run on --resume as --set train.steps does
    run_ok("train", "--cache", cache, "--out", run, "--resume", "--steps", "3", "-q")
    assert [e["step"] for e in log(run)][-1] == 3
    bad = invoke("train", "--cache", cache, "--out", tmp_path / "bad", "--device", "tpu", code=1)
    assert "error: train.device must be auto, cpu, cuda or cuda:N, got 'tpu'" in bad.output


def test_eval_every_logs_val_ap_and_keeps_the_best_checkpoint(cache, tmp_path):
    run = tmp_path / "run"
    training.train(
        cache_path=cache,
        run_dir=run,
        progress=False,
        config=config("train.steps=7", "train.eval_every=3", "train.log_every=5", "train.lr=1e-3"),
    )
    entries = log(run)
    # validated at every 3rd step and at the end, each such step logged whatever log_every says
    assert [e["step"] for e in entries] == [3, 5, 6, 7]
    validated = [e for e in entries if "val" in e]
    assert [e["step"] for e in validated] == [3, 6, 7]
    assert all(
        e["val"]["split"] == "val" and set(e["val"]["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        for e in validated
    )
    aps = [e["val"]["segm"]["AP"] for e in validated]
    assert max(aps) > 0  # a head that learned something: the comparison below means something
    best = torch.load(run / "best.pt", weights_only=True)
    first_max = next(e for e in validated if e["val"]["segm"]["AP"] == max(aps))
    assert best["best"] == {"step": first_max["step"], "segm_AP": max(aps), "split": "val"}
    assert best["step"] == first_max["step"] and first_max["val"].get("best") is True
    assert torch.load(run / "checkpoint.pt", weights_only=True)["best"] == best["best"]
    # `eval --checkpoint best` evaluates that head: the AP training recorded, its own metrics file
    done = run_ok("eval", "--cache", cache, "--run", run, "--checkpoint", "best", "--device", "cpu", "-q", "--json")
    metrics = json.loads(done.stdout)
    assert metrics["segm"]["AP"] == pytest.approx(max(aps), abs=1e-12)
    assert metrics["checkpoint"] == {"file": "best.pt", "step": first_max["step"]}
    assert json.loads((run / "metrics_best.json").read_text())["checkpoint"]["step"] == first_max["step"]
    assert not (run / "metrics.json").exists()
    missing = invoke("eval", "--cache", cache, "--run", tmp_path / "none", "--checkpoint", "best", code=1)
    assert "no best checkpoint in" in missing.output


def test_resume_with_eval_every_equals_the_uninterrupted_run(cache, tmp_path, monkeypatch):
    settings = ("train.steps=4", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1")
    full, part, plain = tmp_path / "full", tmp_path / "part", tmp_path / "plain"
    training.train(cache_path=cache, run_dir=full, config=config(*settings), progress=False)
    calls, original = [], training.head_loss

    def interrupt_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 validation and checkpoint
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "head_loss", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        training.train(cache_path=cache, run_dir=part, config=config(*settings), progress=False)
    monkeypatch.undo()
    assert torch.load(part / "checkpoint.pt", weights_only=True)["best"]["step"] == 2
    training.train(cache_path=cache, run_dir=part, config=config(*settings), resume=True, progress=False)
    assert log(part) == log(full)
    # validating draws nothing from the training's random streams: the run without it ends the same
    training.train(cache_path=cache, run_dir=plain, config=config(*settings[:1], *settings[2:]), progress=False)
    states = [torch.load(run / "checkpoint.pt", weights_only=True) for run in (full, part, plain)]
    for other in states[1:]:
        assert all(torch.equal(states[0]["model"][k], other["model"][k]) for k in states[0]["model"])
        assert torch.equal(states[0]["rng"], other["rng"])
    assert [{k: v for k, v in e.items() if k != "val"} for e in log(full)] == log(plain)
    best_full, best_part = (torch.load(run / "best.pt", weights_only=True) for run in (full, part))
    assert best_full["best"] == best_part["best"]
    assert all(torch.equal(best_full["model"][k], best_part["model"][k]) for k in best_full["model"])


def test_tensorboard_scalars(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    training.train(
        cache_path=cache,
        run_dir=run,
        progress=False,
        config=config("train.steps=4", "train.eval_every=2", "train.log_every=1", "train.tensorboard=true"),
    )
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/positives",
        "train/bce",
        "train/dice",
        "val/segm_AP",
        "val/segm_AP50",
        "val/segm_AP75",
    } <= tags
    entries = log(run)
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("train/loss")] == [
        (e["step"], e["loss"]) for e in entries
    ]
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("val/segm_AP")] == [
        (e["step"], e["val"]["segm"]["AP"]) for e in entries if "val" in e
    ]
    assert [s.step for s in events.Scalars("val/segm_AP")] == [2, 4]


def test_tensorboard_asked_for_but_not_installed_is_one_line(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import then raises ImportError
    result = invoke(
        "train", "--cache", cache, "--out", tmp_path / "run", "--steps", "1", "--set", "train.tensorboard=true", code=1
    )
    assert (
        "error: train.tensorboard=true needs the tensorboard package: pip install 'mfcache[tensorboard]'"
        in result.output
    )
    assert not (tmp_path / "run").exists()


def test_eval_every_needs_a_val_split(shapes_data, tmp_path):
    from mfcache.stages.extract import extract

    coco = json.loads((shapes_data / "annotations" / "train.json").read_text())
    one = coco["images"][0]
    (tmp_path / "train.json").write_text(
        json.dumps(
            {**coco, "images": [one], "annotations": [a for a in coco["annotations"] if a["image_id"] == one["id"]]}
        )
    )
    only_train = tmp_path / "cache"
    extract(
        detector="demo",
        images=shapes_data / "train",
        annotations=tmp_path / "train.json",
        out=only_train,
        config=ExtractConfig(topk=10, target_size=16, num_workers=0, device="cpu", c1="store"),
        progress=False,
    )
    result = invoke(
        "train", "--cache", only_train, "--out", tmp_path / "run", "--steps", "1", "--set", "train.eval_every=1", code=1
    )
    assert "has only training splits (train): extract a val split" in result.output
    assert not (tmp_path / "run").exists()


def test_sweep_steps_and_device(cache, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--cache",
        cache,
        "--heads",
        "box_baseline",
        "--out",
        out,
        "--steps",
        "2",
        "--device",
        "cpu",
        "-q",
        *[a for s in SETTINGS if not s.startswith("train.device") for a in ("--set", s)],
    ]
    run_ok(*args)
    (row,) = json.loads((out / "sweep.json").read_text())
    assert row["config"]["train"]["steps"] == 2 and row["config"]["train"]["device"] == "cpu"
    # how a head ran (its device) is not what it learned: a rerun elsewhere reuses it
    again = run_ok(*[a if a != "cpu" else "auto" for a in args])
    assert "already done" in again.output
    longer = invoke(*[a if a != "2" else "3" for a in args], code=1)
    assert "holds a run with another configuration" in longer.output
