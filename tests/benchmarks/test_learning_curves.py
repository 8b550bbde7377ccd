"""benchmarks/learning_curves.py reads what training logs: the loss at logged steps and the
val segm AP at validated ones (an entry may carry both, or a validation alone)."""

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_curves_come_from_the_run_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    entries = [
        {"step": 25, "loss": 1.0},
        {"step": 50, "loss": 0.8, "val": {"split": "val", "segm": {"AP": 0.12}}},
        {"step": 60, "loss": 0.7, "val": {"split": "val", "segm": {"AP": None}}},  # a split without GT
        {"step": 75, "loss": 0.6, "val": {"split": "val", "segm": {"AP": 0.2}, "best": True}},
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "learning_curves.py"),
            "--run",
            str(run),
            "--label",
            "raw",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    curves = json.loads((tmp_path / "out" / "learning_curves.json").read_text())["raw"]
    assert curves["loss"] == [[25, 1.0], [50, 0.8], [60, 0.7], [75, 0.6]]
    assert curves["val_segm_AP"] == [[50, 0.12], [75, 0.2]]
    assert "| 50 | 12.0 |" in proc.stdout and "| 75 | 20.0 |" in proc.stdout
    assert (tmp_path / "out" / "learning_curves.png").stat().st_size > 0
