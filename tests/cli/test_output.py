"""What the commands print, and where: results (tables, summaries, `--json`) on stdout,
progress and diagnostics on stderr, nothing wrapped in a file or a pipe; `--version`, `-h`."""

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest

from mfcache.config import preset_names
from tests.helpers.cli import COMMANDS, invoke, run_mfcache, run_ok

# what a narrow terminal would say; a pipe must ignore it
NARROW = {"COLUMNS": "80"}


@pytest.fixture(scope="module")
def made(shapes_data, tmp_path_factory):
    """A cache of 2 train and 2 val images and a head trained 2 steps on it."""
    from mfcache.config import ExtractConfig, resolve_run_config
    from mfcache.stages.extract import extract
    from mfcache.stages.train import train

    root = tmp_path_factory.mktemp("output")
    for split in ("train", "val"):
        coco = json.loads((shapes_data / "annotations" / f"{split}.json").read_text())
        keep = {im["id"] for im in coco["images"][:2]}
        subset = {
            **coco,
            "images": coco["images"][:2],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep],
        }
        (root / f"{split}.json").write_text(json.dumps(subset))
        extract(
            detector="demo",
            images=shapes_data / split,
            annotations=root / f"{split}.json",
            out=root / "cache",
            config=ExtractConfig(num_workers=0, batch_size=1, topk=20, device="cpu"),
            progress=False,
        )
    config = resolve_run_config("box_baseline", ["train.steps=2", "train.batch_size=2", "train.device=cpu"])
    train(cache_path=root / "cache", run_dir=root / "run", config=config, progress=False)
    return root


def test_eval_pipes_its_table_to_stdout_whole_and_progress_to_stderr(made):
    out = made / ("a-folder-with-a-long-name-" * 4) / "metrics.json"
    done = run_mfcache(
        "eval", "--cache", made / "cache", "--run", made / "run", "--out", out, "--device", "cpu", env=NARROW
    )
    assert done.returncode == 0, done.stderr
    assert f"metrics written to {out}\n" in done.stdout  # one line, however long
    assert "COCO AP on val (2 images), in %" in done.stdout and "as fractions in [0, 1]" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ segm ")]
    metrics = json.loads(out.read_text())
    assert len(rows) == 1 and f"{100 * metrics['segm']['AP']:.1f}" in rows[0]  # the % of metrics.json's fraction
    assert "eval" in done.stderr and "ETA" in done.stderr  # progress lines
    assert "metrics written" not in done.stderr and "COCO AP" not in done.stderr


def test_version():
    done = run_mfcache("--version", env=NARROW)
    assert done.returncode == 0 and done.stdout == f"mfcache {version('mfcache')}\n" and not done.stderr


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "mfcache")
def test_h_is_help_everywhere(command):
    assert "Usage: mfcache" in " ".join(run_ok(*command, "-h").stdout.split())


def json_of(result) -> object:
    """The command's stdout, which must be one JSON document and nothing else."""
    return json.loads(result.stdout)


def test_eval_json_is_metrics_json(made, tmp_path):
    result = run_ok(
        "eval",
        "--cache",
        made / "cache",
        "--run",
        made / "run",
        "--out",
        tmp_path / "m.json",
        "--device",
        "cpu",
        "--json",
    )
    assert json_of(result) == json.loads((tmp_path / "m.json").read_text())
    assert "eval" in result.stderr  # progress, on stderr


def test_inspect_and_verify_json(made, tmp_path):
    described = json_of(run_ok("inspect", made / "cache", "--json"))
    assert [s["name"] for s in described["splits"]] == ["train", "val"]
    assert described["detector"]["spec"] == "demo" and "error" not in described
    verified = json_of(run_ok("verify", made / "cache", "--json"))
    assert verified["ok"] is True and verified["problems"] == []
    assert [(s["name"], s["written"]) for s in verified["splits"]] == [("train", 2), ("val", 2)]

    damaged = tmp_path / "cache"
    shutil.copytree(made / "cache", damaged)
    chunk = next(p for p in sorted((damaged / "val" / "queries").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:10])
    result = invoke("verify", damaged, "--json")
    assert result.exit_code == 1, result.output
    report = json_of(result)
    assert report["ok"] is False and any("split val: queries" in p for p in report["problems"])
    human = invoke("verify", damaged)
    assert human.exit_code == 1, human.output
    assert "is damaged" in human.stdout and "split val: queries" in human.stdout and not human.stderr


def test_heads_json_and_table(made):
    presets = json_of(run_ok("heads", "--json"))["presets"]
    assert [p["name"] for p in presets] == preset_names()
    assert all(p["params"] > 0 and p["description"] for p in presets)
    table = run_ok("heads")
    assert all(name in table.stdout for name in preset_names()) and not table.stderr


def test_sweep_json_is_sweep_json(made, tmp_path):
    result = run_ok(
        "sweep",
        "--cache",
        made / "cache",
        "--heads",
        "box_baseline",
        "--steps",
        1,
        "--set",
        "train.batch_size=2",
        "--set",
        "train.device=cpu",
        "--out",
        tmp_path / "s",
        "--json",
    )
    rows = json_of(result)
    assert rows == json.loads((tmp_path / "s" / "sweep.json").read_text()) and rows[0]["name"] == "box_baseline"
    assert "box_baseline: mask AP" in result.stderr  # the per-head line is progress
    table = run_ok(
        "sweep",
        "--cache",
        made / "cache",
        "--heads",
        "box_baseline",
        "--steps",
        1,  # reuses the run
        "--set",
        "train.batch_size=2",
        "--set",
        "train.device=cpu",
        "--out",
        tmp_path / "s",
    )
    assert "mask AP (%) of 1 heads" in table.stdout and "(already done)" in table.stderr


def test_predict_json_counts_each_image(made, shapes_data, tmp_path):
    images = sorted((shapes_data / "val").glob("*.png"))[:2]
    result = run_ok(
        "predict",
        "--run",
        made / "run",
        *images,
        "--out",
        tmp_path / "p",
        "--device",
        "cpu",
        "--score-threshold",
        0.05,
        "--json",
    )
    summary = json_of(result)
    written = json.loads((tmp_path / "p" / "results.json").read_text())
    assert summary["num_images"] == 2 and summary["num_detections"] == len(written)
    for image_id, (entry, path) in enumerate(zip(summary["per_image"], images), start=1):
        mine = [r for r in written if r["image_id"] == image_id]
        assert entry["image_id"] == image_id and entry["file"] == str(path) and entry["detections"] == len(mine)
        assert entry["drawn"] == sum(r["score"] >= 0.05 for r in mine)
        assert Path(entry["overlay"]).is_file()
    assert summary["num_drawn"] == sum(e["drawn"] for e in summary["per_image"])
    assert "predict" in result.stderr


def test_errors_go_to_stderr_and_leave_stdout_empty(tmp_path):
    result = invoke("eval", "--cache", tmp_path / "missing", "--run", tmp_path, "--json")
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and result.stderr.startswith("error:")
