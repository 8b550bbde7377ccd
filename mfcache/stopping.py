"""Stopping long work on Ctrl-C (SIGINT), SIGTERM (how clusters preempt jobs) or SIGUSR1 (a
scheduler's early warning, SLURM's ``--signal=USR1@120``) at a safe point: a training step,
an extraction batch, a sweep's head. What finished is saved there, so running again resumes
to exactly the uninterrupted result.

While :class:`StopSignals` is active the first signal only records itself; the work finishes
the unit it is in, saves, and raises :class:`Interrupted` (exit status 128 + the signal: 130,
143, 138). A second SIGINT or SIGTERM stops at once (the last periodic save is kept); SIGUSR1
only asks, so a SIGTERM after it (the time limit itself) is still a first stop, not a second.

A scheduler signals every process of the job at once (``scancel``, a pod eviction,
``os.killpg``), DataLoader workers included. The workers are the main process's to end:
:func:`worker_batches` starts them with the stop signals blocked, they ignore them
(:func:`ignore_stop_signals`), and it ends them itself when the work stops, so a worker never
dies mid-batch of a signal (torch would raise ``DataLoader worker ... killed by signal`` in
the main process) and never outlives it (multiprocessing ends leftover workers with SIGTERM at
exit, which they ignore: they are ended before that, and killed if they do not end).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator

import torch

from mfcache.distributed import all_sum

EARLY_WARNING = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, EARLY_WARNING)


class Interrupted(KeyboardInterrupt):
    """Work stopped by signal ``signum`` at a safe point after saving what it finished
    (``detail`` says where, e.g. ``at step 3 of 8; checkpoint saved to RUN/checkpoint.pt``);
    the process should exit with ``exit_code``: 128 + the signal (130 SIGINT, 143 SIGTERM,
    138 SIGUSR1)."""

    def __init__(self, signum: int, detail: str):
        self.signum, self.detail = signum, detail
        super().__init__(f"{signal.Signals(signum).name} {detail}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores every stop signal (a signal to the
    process group is the main process's to act on; it ends the workers itself), then unblocks
    them (:func:`worker_batches` starts workers with them blocked, so none arrives in between)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _blocked(signums: Iterable[int]) -> Iterator[None]:
    """The signals ``signums`` held back in this thread (and in processes forked meanwhile);
    one that arrives is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def worker_batches(loader: Iterable) -> Iterator[Iterator]:
    """``iter(loader)`` for the body, its worker processes (if any) deaf to stop signals and
    ended when the body ends, however it ends: stopped by a signal, failed, or finished.
    The loader must use :func:`ignore_stop_signals` as its ``worker_init_fn``."""
    with _blocked(STOP_SIGNALS):  # the workers fork with them blocked; ignore_stop_signals unblocks
        batches = iter(loader)
    try:
        yield batches
    finally:
        end_workers(batches)


def end_workers(batches: Iterator) -> None:
    """End the worker processes of a DataLoader iterator now: torch's own shutdown (each worker
    leaves its loop and exits), then SIGKILL for any still alive (they ignore SIGTERM). A
    single-process iterator has none."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            worker.join()


class StopSignals:
    """``with StopSignals() as stop:`` SIGINT/SIGTERM/SIGUSR1 set ``stop.signum`` instead of
    ending the process (only in the main thread, where Python delivers signals; elsewhere a
    no-op). A second SIGINT or SIGTERM raises :class:`Interrupted` at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and EARLY_WARNING not in (signum, self.signum):  # the second: stop now
            self._restore()
            raise Interrupted(signum, "again: stopped at once")
        if self.signum in (None, EARLY_WARNING):  # a stop after the early warning is what it reports
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
