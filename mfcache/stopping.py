"""Stopping a training run on Ctrl-C (SIGINT) or SIGTERM (how clusters preempt jobs) at a
step boundary, so the checkpoint saved there resumes to exactly the uninterrupted run.

While :class:`StopSignals` is active the first signal only records itself; the loop finishes
the step it is in, saves, and raises :class:`Interrupted`. A second signal stops at once
(:class:`KeyboardInterrupt`, the last periodic checkpoint is kept). DataLoader workers ignore
SIGINT (:func:`ignore_stop_signals`): a Ctrl-C reaches the whole process group, and a worker
that died of it would break the batch the last step still needs. They keep SIGTERM's default,
because it is how multiprocessing ends workers left running at exit (a worker ignoring it
hangs the exit); a SIGTERM sent to the whole process group therefore ends the workers too.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from mfcache.distributed import all_sum

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving a checkpoint at ``step``; the process should
    exit with ``exit_code`` (128 + the signal number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, total: int, checkpoint: Path):
        self.signum, self.step, self.total, self.checkpoint = signum, step, total, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step} of {total}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a Ctrl-C to the process group stops only the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopSignals:
    """``with StopSignals() as stop:`` SIGINT/SIGTERM set ``stop.signum`` instead of killing the
    process (only in the main thread, where Python delivers signals; elsewhere a no-op)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self, device: torch.device, world_enabled: bool) -> bool:
        """Whether to stop after this step. Under torchrun every rank calls this at every step
        and they all stop at the same one (any rank's signal counts: torchrun forwards a
        signal to all of them, but not at the same instant)."""
        if not world_enabled:
            return self.signum is not None
        any_rank = all_sum(int(self.signum is not None), device) > 0
        if any_rank and self.signum is None:
            self.signum = signal.SIGTERM
        return any_rank
