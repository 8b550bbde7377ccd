"""The commands as a user runs them."""

import json

import pytest
from typer.testing import CliRunner

from mfcache.cli.main import app

runner = CliRunner()
COMMANDS = [["demo"], ["data", "shapes"], ["extract"], ["train"], ["eval"], ["inspect"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example: mfcache " + command[0] in " ".join(result.output.split())


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_pipeline_end_to_end(shapes_data, tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    for split in ("train", "val"):
        run("extract", "--detector", "demo", "--images", shapes_data / split,
            "--annotations", shapes_data / "annotations" / f"{split}.json", "--out", cache, "--workers", 0, "-q")
    out = run("inspect", cache)
    assert "split train: " in out and "8/8 images complete" in out and "memory" in out
    run("train", "--cache", cache, "--out", run_dir, "--set", "train.steps=3", "--set", "train.batch_size=2", "-q")
    assert (run_dir / "checkpoint.pt").is_file()
    run("eval", "--cache", cache, "--run", run_dir, "--out", tmp_path / "metrics.json", "-q")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for iou_type in ("segm", "bbox"):
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in metrics[iou_type].values())
    assert set(metrics["box_filled"]) == {"segm"}
    assert metrics["config"]["train"]["steps"] == 3

    # a finished extraction re-run writes nothing; training again needs --resume
    out = run("extract", "--detector", "demo", "--images", shapes_data / "val",
              "--annotations", shapes_data / "annotations" / "val.json", "--out", cache, "--workers", 0, "-q")
    assert "(0 written now)" in out
    again = runner.invoke(app, ["train", "--cache", str(cache), "--out", str(run_dir), "-q"])
    assert again.exit_code == 1 and "--resume" in again.output


def test_user_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--cache", str(tmp_path / "missing"), "--run", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output
    result = runner.invoke(app, ["extract", "--detector", "nope:x", "--images", str(tmp_path),
                                 "--annotations", str(tmp_path / "a.json"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "error:" in result.output
