"""What a training run shows while it runs, besides its progress bar: the settings it starts
with (:func:`settings_summary`, on stderr) and, with ``train.tensorboard``, its log entries as
TensorBoard scalars in ``RUN/tensorboard/`` (:class:`Scalars`; the optional extra
``pip install 'mfcache[tensorboard]'``).

TensorBoard is off by default, as in transformers' Trainer (``report_to="none"``) and unlike
Lightning (on whenever installed): what a run writes then does not depend on what else happens
to be installed, and ``log.jsonl`` already holds every number the scalars show.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mfcache.config import RunConfig
from mfcache.errors import MfcacheError
from mfcache.stages.runs import RUN_INFO

TENSORBOARD = "tensorboard"  # the event files' folder in the run folder
# shown in the summary's first lines, so left out of its list of the train settings that differ from the defaults
_IN_HEADER = {"steps", "batch_size", "device", "lr", "amp", "eval_every", "tensorboard"}


def settings_summary(
    config: RunConfig,
    *,
    cache: Path,
    split: str,
    images: int,
    run_dir: Path,
    device: torch.device,
    ranks: int,
    step: int,
    validation: str | None,
    held_out: list[str] | None = None,
) -> str:
    """A few lines for stderr: the head, cache, split, device, steps and batch, then every head,
    train and eval setting that differs from its default (whole config: ``RUN/config.json``).
    ``step`` > 0: the run resumes there; ``validation``: the split validated on; ``held_out``:
    the categories whose instances ``train.categories`` leaves out of the loss."""
    tc = config.train
    start = f" (resuming at step {step})" if step else ""
    lines = [
        f"training {config.head.name}{start}: cache {cache}, split {split} ({images} images), run {run_dir}",
        f"  {device}{f' x {ranks} ranks' if ranks > 1 else ''}, {tc.steps} steps, batch {tc.batch_size}, "
        f"lr {tc.lr:g}, amp {tc.amp}, "
        + (
            f"val segm AP every {tc.eval_every} steps on {validation!r} (best.pt kept)"
            if validation
            else "no periodic validation"
        )
        + (f", tensorboard {run_dir / TENSORBOARD}" if tc.tensorboard else ""),
    ]
    for section, skip in (("head", {"name", "description"}), ("train", _IN_HEADER), ("eval", set())):
        changed = non_default(getattr(config, section), skip)
        rest = "the rest at defaults" if section == "train" else "defaults"  # the line above has steps, lr, ...
        lines.append(f"  {section}: {', '.join(changed) if changed else rest}")
    if held_out:
        lines.append(
            f"  masks learned from {', '.join(tc.categories)} only; held out (instances left out of the "
            f"loss): {', '.join(held_out)}"
        )
    lines.append(f"  full configuration: {run_dir / RUN_INFO}")
    return "\n".join(lines)


def non_default(settings, skip: set[str] = frozenset()) -> list[str]:
    """``["roi_size=64", ...]``: the fields of a config dataclass that differ from their defaults."""

    def shown(value) -> str:
        if isinstance(value, tuple):
            return "[" + ", ".join(map(shown, value)) + "]"
        return (
            f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
        )

    return [
        f"{f.name}={shown(getattr(settings, f.name))}"
        for f in dataclasses.fields(settings)
        if f.name not in skip and getattr(settings, f.name) != f.default
    ]


def require_tensorboard() -> None:
    """Raise one line unless TensorBoard can be written (``train.tensorboard=true``)."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (raises ImportError without the tensorboard package)
    except ImportError:
        raise MfcacheError(
            "train.tensorboard=true needs the tensorboard package: pip install 'mfcache[tensorboard]' "
            "(or pip install tensorboard), or leave train.tensorboard off"
        ) from None


class Scalars:
    """The training log's entries as TensorBoard scalars in ``run_dir/tensorboard/``:
    ``train/loss``, ``train/lr``, ``train/positives``, each loss part (``train/bce``, ...) and
    ``val/segm_AP``, ``val/segm_AP50``, ... at the steps that validated. ``enabled`` False: a
    no-op (the option off, or a rank other than 0). A resumed run (``step`` > 0) hides the
    events an interrupted run wrote after its checkpoint (``purge_step``)."""

    def __init__(self, run_dir: Path, *, enabled: bool, step: int = 0):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD), purge_step=step or None)

    def __enter__(self) -> Scalars:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def write(self, entry: dict) -> None:
        """One log entry (``{"step", "loss", "lr", ..., "val": {"segm": {...}}}``)."""
        if self.writer is None:
            return
        step = entry["step"]
        for key, value in entry.items():
            if key == "val":
                for name, ap in value["segm"].items():
                    if ap is not None:
                        self.writer.add_scalar(f"val/segm_{name}", ap, step)
            elif key != "step" and isinstance(value, (int, float)):  # a step without positives has loss None
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()
