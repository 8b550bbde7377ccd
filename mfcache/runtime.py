"""Process-level helpers shared by the stages: device choice, mixed precision and progress bars."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mfcache.errors import MfcacheError

if TYPE_CHECKING:
    import torch

# Two streams, as command-line tools keep them: results (tables, summaries, `--json`) on stdout, so
# that `mfcache inspect CACHE > cache.txt` or `mfcache eval ... --json | jq` hold the result alone;
# progress, warnings and errors on stderr.
console = Console(stderr=True)  # progress bars and lines, warnings, errors
console.soft_wrap = not console.is_terminal  # in a log or a pipe, long lines stay whole (paths, messages)
stdout = Console()  # results
if not stdout.is_terminal:  # a file or a pipe: no line and no table cell is wrapped at 80 columns
    stdout.soft_wrap, stdout.width = True, 10_000


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    import torch  # here, so that `mfcache --help` does not pay for importing torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MfcacheError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MfcacheError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def progress_bar(enabled: bool = True) -> Progress | LineProgress:
    """A rich progress bar (on stderr) with count, rate-independent ETA and elapsed time; when
    stderr is not a terminal (a log file, a pipe, a cluster job), plain progress lines
    instead (:class:`LineProgress`), since rich would draw its bar only once, at the end."""
    if enabled and not console.is_terminal:
        return LineProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


class LineProgress:
    """Progress as plain lines on stderr, for logs: ``extract val2017: 1200/5000 (24%), 3.1/s,
    ETA 20m 26s, elapsed 6m 27s, <status>`` at most every ``every`` seconds, and once when a
    task finishes. The subset of rich's ``Progress`` that mfcache uses (``add_task``,
    ``advance``, ``update``)."""

    def __init__(self, every: float = 30.0):
        self.every, self.tasks = every, {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks.values():
            if task["completed"] != task["printed"]:
                self._print(task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = time.monotonic()
        self.tasks[len(self.tasks)] = {
            "description": description,
            "total": total,
            "completed": completed,
            "start": completed,
            "status": fields.get("status", ""),
            "started": now,
            "last": now,
            "printed": None,
        }
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(
        self, task: int, *, advance: float = 0, completed: float | None = None, status: str | None = None, **_
    ) -> None:
        t = self.tasks[task]
        t["completed"] = completed if completed is not None else t["completed"] + advance
        if status is not None:
            t["status"] = status
        if time.monotonic() - t["last"] >= self.every or (t["total"] and t["completed"] >= t["total"]):
            self._print(t)

    def _print(self, t: dict) -> None:
        now = time.monotonic()
        t["last"], t["printed"] = now, t["completed"]
        elapsed = now - t["started"]
        rate = (t["completed"] - t["start"]) / elapsed if elapsed > 0 else 0.0
        parts = [f"{t['description']}: {t['completed']:g}"]
        if t["total"]:
            parts[0] += f"/{t['total']:g} ({100 * t['completed'] / t['total']:.0f}%)"
            if rate > 0:
                parts.append(f"ETA {_duration((t['total'] - t['completed']) / rate)}")
        parts.insert(1, f"{rate:.3g}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if t["status"]:
            parts.append(str(t["status"]))
        console.print(", ".join(parts), highlight=False, soft_wrap=True, markup=False)


def _duration(seconds: float) -> str:
    """``1234`` -> ``20m 34s``."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device``: ``amp`` is ``off`` (float32), ``bf16`` or ``fp16``
    (torch's autocast: matmuls and convolutions in the low precision, reductions and losses in
    float32)."""
    import torch

    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, AMP_DTYPES[amp]))
