"""Process-level helpers shared by the stages: device choice, mixed precision and progress bars."""

from __future__ import annotations

import contextlib
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

console = Console(stderr=True)


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


def progress_bar(enabled: bool = True) -> Progress:
    """A rich progress bar (on stderr) with count, rate-independent ETA and elapsed time."""
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


AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device``: ``amp`` is ``off`` (float32), ``bf16`` or ``fp16``
    (torch's autocast: matmuls and convolutions in the low precision, reductions and losses in
    float32)."""
    import torch

    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, AMP_DTYPES[amp]))
