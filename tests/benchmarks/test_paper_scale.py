"""benchmarks/paper_scale.py runs end to end (extract -> train -> eval -> projection) with the
hidden ``--tiny`` plan (tiny native H-DETR and DINO, 48x64 images), and what it writes holds
every storage option's measured bytes, the trained heads and the COCO projection."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_tiny_run_writes_measured_bytes_training_eval_and_projection(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "paper_scale.py"),
            "--tiny",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path),
            "--storage",
            "f32=dtype=float32,c1=none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "paper_scale.json").read_text())
    assert result["meta"]["finished"] and result["meta"]["plan"]["tiny"]

    measured = result["bytes_per_image"]
    assert set(measured) == {"hdetr_r50", "dino_4scale_r50"} and list(measured["dino_4scale_r50"]) == ["float16"]
    hdetr = measured["hdetr_r50"]
    assert {"float16", "int8", "float16+compress", "float16 c1=none", "int8 c1=none", "f32"} <= set(hdetr)
    # measured on the written caches (at these tiny sizes 4 KiB blocks hide int8's saving)
    assert hdetr["float16 c1=none"] < hdetr["float16"] and hdetr["int8 c1=none"] < hdetr["int8"]
    assert hdetr["f32"] > hdetr["float16 c1=none"]
    for row in result["extract"]:
        assert "error" in row or (row["s_per_image"] > 0 and row["fixed_bytes"] > 0), row
    assert [r["images"] for r in result["extract"] if r["detector"] == "dino_4scale_r50"] == [1]  # untrained: 1

    heads = {(r["detector"], r["head"]): r for r in result["train_eval"]}
    assert set(heads) == {("hdetr_r50", "paper_final"), ("hdetr_r50", "box_baseline")}
    for row in heads.values():
        assert "error" not in row, row
        assert row["batch"] == 2 and row["s_per_step"] > 0 and row["eval_s_per_image"] > 0
        assert row["peak_GiB"] is None or row["peak_GiB"] > 0

    projection = result["projection"]
    f16 = next(s for s in projection["storage"] if (s["detector"], s["storage"]) == ("hdetr_r50", "float16"))
    assert math.isclose(f16["train2017_TB"], hdetr["float16"] * 118_287 / 1e12)
    assert {h["head"] for h in projection["heads"]} == {"paper_final", "box_baseline"}
    table = (tmp_path / "out" / "paper_scale.md").read_text()
    assert "| hdetr_r50 | int8 c1=none |" in table and "| hdetr_r50 | paper_final |" in table
