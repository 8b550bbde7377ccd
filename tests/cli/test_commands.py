"""The commands as a user runs them."""

import json
import re

import pytest

from tests.helpers import ROOT
from tests.helpers.cli import COMMANDS, invoke, run_ok

COMMANDS_PAGE = (ROOT / "docs" / "commands" / "index.md").read_text()


def test_the_commands_are_the_documented_set():
    """The app's commands and docs/commands/index.md's sections are the same set, and it is the one
    the docs name: a command added, removed or renamed on one side only fails here."""
    names = {" ".join(c) for c in COMMANDS}
    documented = set(re.findall(r"^## `mfcache ([a-z][a-z ]*)`", COMMANDS_PAGE, re.M))
    assert names == documented, f"only in the app: {names - documented}; only in the docs: {documented - names}"
    assert names == {
        "demo",
        "data shapes",
        "extract",
        "train",
        "eval",
        "inspect",
        "heads",
        "sweep",
        "predict",
        "verify",
    }


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example_and_a_docs_section(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example: mfcache " + command[0] in " ".join(result.output.split())
    assert f"## `mfcache {' '.join(command)}`" in COMMANDS_PAGE, (
        f"docs/commands/index.md has no section for mfcache {' '.join(command)}"
    )


def test_pipeline_end_to_end(shapes_data, tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    for split in ("train", "val"):
        run_ok(
            "extract",
            "--detector",
            "demo",
            "--images",
            shapes_data / split,
            "--annotations",
            shapes_data / "annotations" / f"{split}.json",
            "--out",
            cache,
            "--workers",
            0,
            "-q",
        )
    out = run_ok("inspect", cache).output
    assert "split train: " in out and "8/8 images complete" in out and "memory" in out
    for command in ("inspect", "verify"):  # the cache as CACHE or as --cache, like the other commands
        assert run_ok(command, "--cache", cache).output == run_ok(command, cache).output
        two = invoke(command, cache, "--cache", tmp_path / "other")
        none = invoke(command)
        assert two.exit_code == none.exit_code == 1
        assert "error: two caches given" in two.output and "error: no cache given" in none.output
    run_ok("train", "--cache", cache, "--out", run_dir, "--set", "train.steps=3", "--set", "train.batch_size=2", "-q")
    assert (run_dir / "checkpoint.pt").is_file()
    run_ok("eval", "--cache", cache, "--run", run_dir, "--out", tmp_path / "metrics.json", "-q")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for iou_type in ("segm", "bbox"):
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in metrics[iou_type].values())
    assert set(metrics["box_filled"]) == {"segm"}
    # 3 steps teach the head nothing (segm AP 0.0), but the boxes are the frozen detector's:
    # bbox AP 0.667 on these 4 val images (2026-11-29). Mask accuracy: tests/guarantees/test_accuracy.py.
    assert metrics["bbox"]["AP"] >= 0.4
    assert metrics["config"]["train"]["steps"] == 3

    # a finished extraction re-run writes nothing; training again needs --resume
    out = run_ok(
        "extract",
        "--detector",
        "demo",
        "--images",
        shapes_data / "val",
        "--annotations",
        shapes_data / "annotations" / "val.json",
        "--out",
        cache,
        "--workers",
        0,
        "-q",
    ).output
    assert "(0 written now)" in " ".join(out.split())  # rich wraps long paths
    again = invoke("train", "--cache", cache, "--out", run_dir, "-q")
    assert again.exit_code == 1 and "--resume" in again.output


def test_user_errors_are_one_line(tmp_path):
    result = invoke("eval", "--cache", tmp_path / "missing", "--run", tmp_path)
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "Traceback" not in result.output
    result = invoke(
        "extract",
        "--detector",
        "nope:x",
        "--images",
        tmp_path,
        "--annotations",
        tmp_path / "a.json",
        "--out",
        tmp_path / "c",
    )
    assert result.exit_code == 1 and "error:" in result.output


def test_demo_runs_the_whole_pipeline_and_resumes(tmp_path):
    out = tmp_path / "demo"
    printed = run_ok("demo", "--out", out, "--train", 8, "--val", 4, "--steps", 2, "-q").output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["head"]["name"] == "blendmask" and metrics["config"]["train"]["steps"] == 2
    assert {"segm", "bbox", "box_filled"} <= metrics.keys() and metrics["num_images"] == 4
    assert "bbox AP 0.500" in " ".join(printed.split())  # the shipped detector's training.json
    overlays = sorted((out / "overlays").glob("*.png"))
    assert overlays and str(out / "overlays") in "".join(printed.split())  # rich may wrap a long path anywhere
    images = sorted((out / "data" / "train").iterdir())
    stamp = images[0].stat().st_mtime_ns
    again = run_ok("demo", "--out", out, "--train", 8, "--val", 4, "--steps", 2, "-q").output
    assert images[0].stat().st_mtime_ns == stamp and "demo: COCO AP" in again  # data kept, the run resumed


def test_demo_with_an_unknown_head_fails_before_doing_anything(tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo", "--head", "nope")
    assert result.exit_code == 1 and result.output.startswith("error:") and "nope" in result.output
    assert not (tmp_path / "demo").exists()


def test_progress_in_a_log_is_plain_lines(tmp_path):
    """Output that is not a terminal (a log file, a pipe, this runner) gets progress lines with
    count, rate and ETA, where a rich bar would appear only at the end."""
    out = run_ok("data", "shapes", "--out", tmp_path / "d", "--train", 3, "--val", 1).output
    line = next(line for line in out.splitlines() if line.startswith("shapes: "))
    assert line.startswith("shapes: 4/4 (100%), ") and "/s, ETA " in line and "elapsed " in line
