"""Train and evaluate many heads from one cache (the detector is never loaded) and tabulate
mask AP against cost: ``DIR/<head>/`` run folders, ``DIR/sweep.json``, ``sweep.md``, ``sweep.png``.

Resumable: a head whose run folder already holds ``metrics.json`` is not retrained (its row
is read back from ``sweep_row.json``); a run interrupted mid-training resumes from its checkpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import threading
from pathlib import Path

import torch

from mfcache.cache.reader import Cache
from mfcache.config import RESUMABLE, RunConfig, load_head_file, preset_names, resolve_run_config
from mfcache.errors import MfcacheError
from mfcache.outputs import check_folder, write_errors
from mfcache.runtime import resolve_device
from mfcache.stages.evaluate import evaluate
from mfcache.stages.runs import CHECKPOINT, head_for
from mfcache.stages.train import train
from mfcache.stopping import Interrupted, StopSignals

ROW_FILE = "sweep_row.json"
AP_KEYS = ("AP", "AP50", "APs", "APm", "APl")


def resolve_heads(heads: list[str]) -> list[str]:
    """``["all"]`` -> every preset; otherwise preset names / TOML files, checked to exist."""
    names = preset_names() if heads == ["all"] or not heads else list(heads)
    for head in names:
        load_head_file(head)  # raises a one-line MfcacheError for an unknown name or a missing file
    return names


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ResidentPeak:
    """Peak resident memory of this process (MiB) while the ``with`` block runs, sampled every
    20 ms from ``/proc/self/statm`` by a background thread; ``peak_mb`` is None where there is
    no ``/proc`` (the process-wide ``ru_maxrss`` cannot be reset between heads). On entry, freed
    memory that glibc still holds is handed back (``malloc_trim``), so an earlier, larger head
    does not count towards this one."""

    STATM = Path("/proc/self/statm")

    def __init__(self):
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    def _sample(self) -> float:
        return int(self.STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._sample())

    def __enter__(self) -> ResidentPeak:
        gc.collect()
        trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
        if trim is not None:
            trim(0)
        if self.STATM.exists():
            self.peak_mb = self._sample()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.peak_mb is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._sample())


def train_and_evaluate(
    *, cache_path: Path, config: RunConfig, run_dir: Path, split: str | None, eval_split: str | None, progress: bool
) -> dict:
    """Train + evaluate one head in ``run_dir`` and return its sweep row.

    ``peak_memory_mb``: on CUDA the peak allocated memory while training; on the CPU the
    process's peak resident memory while training (:class:`ResidentPeak`), or None if unknown."""
    device = resolve_device(config.train.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    resume = (run_dir / CHECKPOINT).exists()
    cache = Cache(cache_path)
    with ResidentPeak() as resident:
        last = train(
            cache_path=cache_path, run_dir=run_dir, config=config, split=split, resume=resume, progress=progress
        )
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else resident.peak_mb
    metrics = evaluate(
        cache_path=cache_path,
        run_dir=run_dir,
        split=eval_split,
        box_filled=False,
        progress=progress,
        device=config.train.device,
    )
    row = {
        "name": config.head.name,
        **{f"segm_{k}": metrics["segm"].get(k) for k in AP_KEYS},
        "params": parameter_count(head_for(cache.detector, cache.settings, config.head)),
        "train_seconds": round(last["seconds"], 3),
        "peak_memory_mb": None if peak is None else round(peak, 1),
        "config": config.to_dict(),
    }
    with write_errors("the sweep row", run_dir / ROW_FILE):
        (run_dir / ROW_FILE).write_text(json.dumps(row, indent=2))
    return row


def sweep(
    *,
    cache_path: Path,
    heads: list[str],
    out_dir: Path,
    steps: int | None = None,
    device: str | None = None,
    overrides: list[str] | None = None,
    split: str | None = None,
    eval_split: str | None = None,
    progress: bool = True,
    on_row=None,
) -> list[dict]:
    """Train and evaluate each head of ``heads`` (preset names, TOML files or ``["all"]``)
    on ``cache_path``; ``steps`` and ``device`` override ``train.steps`` and ``train.device``
    (training and evaluation), and ``overrides`` are ``--set`` strings applied to every head. Writes ``out_dir/sweep.{json,md,png}``; returns the rows.
    ``on_row(row, reused)`` is called as each head finishes.

    SIGINT, SIGTERM or SIGUSR1 stop it at the next safe point (a training step, or before the
    next head), raising :class:`mfcache.stopping.Interrupted` with every finished head's run
    and row kept: the same call again resumes."""
    out_dir = Path(out_dir)
    names = resolve_heads(heads)
    extra = [
        *(overrides or []),
        *([f"train.steps={steps}"] if steps is not None else []),
        *([f"train.device={device}"] if device else []),
    ]
    configs = [resolve_run_config(name, extra) for name in names]
    taken: dict[str, str] = {}
    for name, config in zip(names, configs):
        if config.head.name in taken:
            raise MfcacheError(
                f"heads {taken[config.head.name]!r} and {name!r} share the name "
                f"{config.head.name!r}; give one a different `head.name`"
            )
        taken[config.head.name] = name
    cache = Cache(cache_path)  # a missing or foreign cache, or a missing split, fails before any run folder is made
    cache.split(split, role="train")
    cache.split(eval_split, role="eval")
    check_folder(out_dir, "`sweep.out_dir` (the sweep folder)")
    with write_errors("the sweep folder", out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with StopSignals() as stop:  # while a head trains, its own stop (train's) takes over
        for config in configs:
            if stop.signum is not None:  # a signal between heads (during an eval): stop before the next
                raise Interrupted(stop.signum, f"after {len(rows)} of {len(configs)} heads")
            rows.append(
                _sweep_head(
                    config, cache_path, out_dir, split=split, eval_split=eval_split, progress=progress, on_row=on_row
                )
            )
            write_outputs(rows, out_dir)  # after every head, so an interrupted sweep keeps its table
    return rows


def _sweep_head(
    config: RunConfig,
    cache_path: Path,
    out_dir: Path,
    *,
    split: str | None,
    eval_split: str | None,
    progress: bool,
    on_row,
) -> dict:
    """The sweep row of one head: read back if its run folder is finished, else trained and
    evaluated (a run interrupted mid-training resumes from its checkpoint)."""
    run_dir = out_dir / config.head.name
    row_file = run_dir / ROW_FILE
    reused = (run_dir / "metrics.json").is_file() and row_file.is_file()
    if reused:
        row = json.loads(row_file.read_text())
        if _what_it_learns(RunConfig.from_dict(row["config"])) != _what_it_learns(config):
            raise MfcacheError(
                f"{run_dir} holds a run with another configuration; delete it or choose another `sweep.out_dir`"
            )
    else:
        row = train_and_evaluate(
            cache_path=cache_path, config=config, run_dir=run_dir, split=split, eval_split=eval_split, progress=progress
        )
    if on_row is not None:
        on_row(row, reused)
    return row


def _what_it_learns(config: RunConfig) -> dict:
    """``config`` without the settings of how a run ran (device, workers, logging, validation;
    :data:`~mfcache.config.RESUMABLE` but ``train.steps``): a finished head is reused whatever
    they were."""
    learned = config.to_dict()
    for key in RESUMABLE:
        if key != "train.steps":
            section, name = key.split(".")
            del learned[section][name]
    return learned


def _fmt_ap(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(rows: list[dict]) -> str:
    """Mask AP (in %) and cost per head, one row each."""
    lines = [
        "| head | AP | AP50 | APs | APm | APl | params | train s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        aps = " | ".join(_fmt_ap(r[f"segm_{k}"]) for k in AP_KEYS)
        memory = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['name']} | {aps} | {r['params']:,} | {r['train_seconds']:.1f} | {memory} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Mask AP vs training seconds, one labelled point per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ap = 100 * (r["segm_AP"] or 0.0)
        ax.scatter(r["train_seconds"], ap, s=20)
        ax.annotate(r["name"], (r["train_seconds"], ap), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("mask AP (%)")
    ax.set_title("mask AP vs training cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], out_dir: Path) -> None:
    with write_errors("the sweep table", out_dir):
        (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
        (out_dir / "sweep.md").write_text(markdown_table(rows))
        plot(rows, out_dir / "sweep.png")
