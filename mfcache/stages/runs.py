"""The run folder, read and written here only.

A run folder holds ``checkpoint.pt`` (head weights, optimizer, resolved config, step, RNG
state, the split and the fingerprint of the cache it was trained on: self-describing, so
``--resume``, ``eval`` and ``predict`` need nothing retyped), ``config.json`` (the config,
the cache path and split, for people and for ``predict``'s category names),
``log.jsonl`` (one line per logged step) and, when training validates periodically
(``train.eval_every``), ``best.pt``: the head at the step of the best val segm AP so far,
which ``eval --checkpoint best`` reads as it reads ``checkpoint.pt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mfcache.cache.schema import ExtractSettings, fingerprint_mismatch
from mfcache.checkpoint_io import load_checkpoint, save_checkpoint
from mfcache.config import HeadConfig, RunConfig
from mfcache.detectors.base import DetectorInfo
from mfcache.errors import MfcacheError
from mfcache.heads import MaskHead, build_head
from mfcache.outputs import write_errors

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CHECKPOINTS = {"last": CHECKPOINT, "best": BEST}  # eval --checkpoint NAME
RUN_INFO = "config.json"
LOG = "log.jsonl"


def head_for(info: DetectorInfo, extract: ExtractSettings, head: HeadConfig) -> MaskHead:
    """A new head for a detector (``info``) cached with ``extract`` (C1 is an input only if the
    cache has it)."""
    return build_head(
        head,
        d_model=info.d_model,
        c1_channels=info.c1_channels if extract.c1 != "none" else 0,
        num_levels=len(info.strides),
        strides=info.strides,
    )


def read_checkpoint(run_dir: Path, device: torch.device | str = "cpu", which: str = "last") -> dict:
    """The checkpoint dict of the run in ``run_dir``: its last (``checkpoint.pt``) or its best
    (``best.pt``) head; a clear error if there is none."""
    if which not in CHECKPOINTS:
        raise MfcacheError(f"unknown checkpoint {which!r}: choose {' or '.join(CHECKPOINTS)}")
    path = Path(run_dir) / CHECKPOINTS[which]
    if not path.is_file():
        if which == "best":
            raise MfcacheError(
                f"no best checkpoint in {run_dir} (expected {BEST}: training keeps one when it "
                "validates periodically, with `train.eval_every=N`)"
            )
        raise MfcacheError(f"no trained head in {run_dir} (expected {CHECKPOINT}; run `mfcache train`)")
    return load_checkpoint(path, what="run checkpoint", map_location=device)


def run_progress(run_dir: Path, state: dict, which: str = "last") -> dict:
    """How far the run in ``run_dir`` trained, for the head ``state`` read from its ``which``
    checkpoint: ``{"step": that head's step, "steps": the run's schedule (train.steps),
    "finished": whether the run reached it, "last_step": the step it reached}``. A run still
    training, or stopped early, is not finished; best.pt's step says nothing of that, so the
    run's last checkpoint decides."""
    steps = int(RunConfig.from_dict(state["config"]).train.steps)
    last = state if which == "last" else _last_state(run_dir)
    reached = int(last["step"]) if last is not None else int(state["step"])
    return {"step": int(state["step"]), "steps": steps, "finished": reached >= steps, "last_step": reached}


def _last_state(run_dir: Path) -> dict | None:
    """``checkpoint.pt`` of ``run_dir`` (on the CPU), or None if there is none."""
    if not (Path(run_dir) / CHECKPOINT).is_file():
        return None
    return read_checkpoint(run_dir, "cpu", "last")


def unfinished_line(run_dir: Path, progress: dict, which: str = "last") -> str:
    """One line saying that the run in ``run_dir`` has not reached its last step (``progress``:
    :func:`run_progress`), which step was evaluated, and how to finish it."""
    head = (
        f"these metrics are of its head at step {progress['step']}"
        if which == "last"
        else f"these metrics are of {CHECKPOINTS[which]}, the head of step {progress['step']}"
    )
    return (
        f"the run in {run_dir} is not finished: trained to step {progress['last_step']} of "
        f"{progress['steps']} (still training, or stopped early: `mfcache train --resume` continues it); {head}"
    )


def checkpoint_to_resume(run_dir: Path, resume: bool) -> dict | None:
    """The checkpoint dict of the run in ``run_dir`` if it is to be resumed; None for a new
    run. A folder that holds a run is refused without ``resume``; ``resume`` without one is too."""
    if (Path(run_dir) / CHECKPOINT).exists():
        if not resume:
            raise MfcacheError(
                f"{run_dir} already holds a run: pass `train.resume` to continue it, or choose another `train.run_dir`"
            )
        return read_checkpoint(run_dir)
    if resume:
        raise MfcacheError(f"nothing to resume: no {CHECKPOINT} in {run_dir}")
    return None


def save_run_checkpoint(
    run_dir: Path,
    *,
    head: MaskHead,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    step: int,
    fingerprint: dict,
    split: str,
    scaler: torch.amp.GradScaler | None = None,
    best: dict | None = None,
) -> None:
    """The run's checkpoint at ``step``, written atomically (the previous one survives a kill);
    with ``scaler`` (``train.amp=fp16``) its loss scale too, with ``best`` the record of
    ``best.pt`` (``{"step", "segm_AP", "split"}``) so a resumed run keeps comparing against it."""
    payload = {
        "model": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": config.to_dict(),
        "step": step,
        "fingerprint": fingerprint,
        "rng": torch.get_rng_state(),
        "split": split,
    }
    if scaler is not None and scaler.is_enabled():
        payload["scaler"] = scaler.state_dict()
    if best is not None:
        payload["best"] = best
    save_checkpoint(Path(run_dir) / CHECKPOINT, payload)


def save_best_checkpoint(
    run_dir: Path, *, head: MaskHead, config: RunConfig, step: int, fingerprint: dict, split: str, best: dict
) -> None:
    """``best.pt``: the head at ``step`` with its val record ``best`` (``{"step", "segm_AP",
    "split"}``), written atomically. What ``eval`` and ``predict`` read, no optimizer: it is
    evaluated, not resumed."""
    save_checkpoint(
        Path(run_dir) / BEST,
        {
            "model": head.state_dict(),
            "config": config.to_dict(),
            "step": step,
            "fingerprint": fingerprint,
            "split": split,
            "best": best,
        },
        what="the best checkpoint",
    )


def write_run_info(run_dir: Path, config: RunConfig, cache_path: Path, split: str) -> None:
    """``config.json``: the resolved config, and the cache and split the run trains on."""
    with write_errors("the run folder", run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_INFO).write_text(
            json.dumps({"config": config.to_dict(), "cache": str(cache_path), "split": split}, indent=2)
        )


def read_run_info(run_dir: Path) -> dict | None:
    """``config.json`` of a run folder, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class LoadedRun:
    """A trained head in eval mode, its config, and the fingerprint of the cache it learned from."""

    head: MaskHead
    config: RunConfig
    fingerprint: dict


def load_run(
    run_dir: Path, wanted: dict, device: torch.device, *, state: dict | None = None, detector: str | None = None
) -> LoadedRun:
    """The trained head of ``run_dir`` (its checkpoint ``state``, read if not given), refused
    unless the cache it was trained on has fingerprint ``wanted`` (the cache about to be read,
    or, for ``predict``, what a cache of ``detector`` with the run's extract settings would be)."""
    run_dir = Path(run_dir)
    state = read_checkpoint(run_dir, device) if state is None else state
    stored = state["fingerprint"]
    problem = fingerprint_mismatch(stored, wanted)
    if problem:
        raise MfcacheError(
            f"the head in {run_dir} was trained on a cache made with {problem}"
            + (f", not with detector {detector!r}" if detector else "")
        )
    config = RunConfig.from_dict(state["config"])
    head = head_for(DetectorInfo.from_dict(stored["detector"]), ExtractSettings.from_fingerprint(stored), config.head)
    head.load_state_dict(state["model"])
    return LoadedRun(head.to(device).eval(), config, stored)
