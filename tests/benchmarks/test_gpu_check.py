"""benchmarks/gpu_check.py works before it meets a GPU: the whole script with ``--device cpu
--quick`` (a subprocess, as the GPU machine runs it), a failing section recorded while the
run goes on, and the CPU-vs-device comparisons with the CPU standing in for the device."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ("environment", "agreement", "demo", "extraction", "training", "projection")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def run_script(tmp_path: Path, *args: str, timeout: int = 480) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(tmp_path / "state")}
    return subprocess.run(
        [
            sys.executable,
            "-X",
            "faulthandler",
            str(SCRIPT),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_quick_cpu_run_has_every_section_without_errors_and_positive_figures(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    for name in SECTIONS:
        assert name in result and "error" not in result[name], (name, result.get(name))
        assert positive(result[name]["seconds"]) or name in ("agreement", "projection")
    assert result["meta"]["finished"] and result["meta"]["quick"]
    assert "CUDA" in result["agreement"]["skipped"]  # no CPU-vs-CUDA comparison on a CPU

    env = result["environment"]
    assert env["torch"] == torch.__version__ and positive(env["cpu_count"]) and env["device"] == "cpu"

    demo = result["demo"]
    assert positive(demo["seconds"]) and 0 <= demo["segm_AP"] <= 1 and "pass" not in demo  # no AP check with --quick
    assert list(demo["stage_seconds"]) == ["data", "extract", "train", "eval"]

    extraction = result["extraction"]
    assert "TINY" in extraction["setup"] and extraction["images"] == 2  # the shrunk run says so
    assert [(s["detector"], s["amp"]) for s in extraction["settings"]] == [
        (d, a) for d in ("hdetr_tiny", "deformable_detr_tiny") for a in ("off", "bf16")
    ]
    for s in extraction["settings"]:
        for key in ("extract_images_per_s", "forward_images_per_s", "extract_over_forward", "bytes_per_image"):
            assert positive(s[key]), (s, key)

    training = result["training"]
    assert [(s["head"], s["amp"]) for s in training["settings"]] == [
        (h, a) for h in ("box_baseline", "blendmask", "paper_final") for a in ("off", "bf16")
    ]
    for s in training["settings"]:
        for key in ("images_per_s", "s_per_step", "reader_images_per_s", "reader_over_train"):
            assert positive(s[key]), (s, key)
        assert s["bound"] in ("reader-bound", "compute-bound")
    assert positive(training["positives_per_image"]) and 0 < training["min_iou"] <= 0.5

    projection = result["projection"]
    assert len(projection["extraction"]) == 4 and len(projection["training"]) == 6 and len(projection["storage"]) == 2
    assert all(positive(p["train2017_hours"]) for p in projection["extraction"])
    assert all(positive(p["paper_schedule_hours"]) for p in projection["training"])
    assert all(positive(p["train2017_TB"]) for p in projection["storage"])
    assert "not representative" in projection["note"]

    table = (tmp_path / "out" / "gpu.md").read_text()
    assert all(f"## {name}" in table for name in SECTIONS) and "ERROR" not in table
    assert "## projection" in proc.stdout  # the markdown is printed too
    assert not list(tmp_path.glob("gpucheck-*"))  # the scratch folder is removed


def test_the_sweep_section_runs_only_when_asked_and_trains_every_gpu_head(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert "sweep" not in gpu_check.DEFAULT_SECTIONS  # ~10 minutes on a GPU: never part of the default check
    proc = run_script(tmp_path, "--only", "sweep", timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sweep = json.loads((tmp_path / "out" / "gpu.json").read_text())["sweep"]
    assert "error" not in sweep and [h["head"] for h in sweep["heads"]] == list(gpu_check.SWEEP_HEADS)
    for h in sweep["heads"]:
        assert 0 <= h["segm_AP"] <= 1 and positive(h["s_per_step"]) and positive(h["over_blendmask"]), h
    assert next(h for h in sweep["heads"] if h["head"] == "blendmask")["over_blendmask"] == 1.0
    assert "| paper_final |" in (tmp_path / "out" / "gpu.md").read_text()


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path):
    proc = run_script(tmp_path, "--only", "projection", "environment", timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert "nothing to project" in result["projection"]["error"]  # no extraction or training ran before it
    assert positive(result["environment"]["cpu_count"])  # the next section still ran
    assert result["meta"]["finished"]
    assert "**ERROR**" in (tmp_path / "out" / "gpu.md").read_text()


def test_the_device_comparisons_run_with_the_cpu_standing_in_for_the_device():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script's --device cpu --quick: a check, on cores shared with others
    try:
        with tempfile.TemporaryDirectory() as work:
            run = gpu_check.Run(
                device=cpu,
                quick=True,
                out=Path(work) / "out",
                work=Path(work),
                budget_s=1e9,
                plan=gpu_check.Plan.make(cpu, quick=True),
            )
            result = gpu_check.agreement(run)
    finally:
        torch.set_num_threads(threads)
    names = [i["item"] for i in result["items"]]
    assert not [i for i in result["items"] if "error" in i], result["items"]
    for prefix in (
        "ms_deform_attn",
        "roi_align",
        "head box_baseline",
        "head blendmask",
        "head paper_final",
        "paste_masks",
        "demo extraction top-k",
    ):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert result["failed"] == 0 and result["passed"] == len(names)
    assert all(i["max_abs"] == 0 for i in result["items"])  # the same device: identical
    assert "| pass |" in "\n".join(gpu_check.md_agreement(result))
