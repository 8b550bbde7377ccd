"""torchrun support shared by `extract` and `train`: rank, world size and the process group.

Under ``torchrun --nproc_per_node N`` every process sees ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in its environment; a plain run is world size 1 and touches no
``torch.distributed`` state. Backends: ``nccl`` when the stage runs on CUDA, else ``gloo``.

A rank that fails while the others wait in a collective (a barrier, a broadcast) would leave
them waiting until the job's time runs out. So setup runs in steps that every rank ends
together (:func:`together`): each step ends in one collective at which every rank learns
whether any failed, and then all raise the same one-line error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mfcache.errors import MfcacheError


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """CUDA runs use ``cuda:LOCAL_RANK`` (one GPU per process); CPU stays CPU."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def world_from_env() -> World:
    """The torchrun world this process belongs to, from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: torch.device) -> tuple[World, bool]:
    """Join the torchrun process group (if there is one and it is not joined yet).

    Returns the world and whether this call created the group (the caller then destroys
    it with :func:`close_world`)."""
    world = world_from_env()
    if not world.enabled or dist.is_initialized():
        return world, False
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, True


def close_world(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value: float | int, device: torch.device) -> float:
    """Sum of a number over all ranks (the number itself without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_max(value: float | int, device: torch.device) -> float:
    """The largest of a number over all ranks (the number itself without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


@contextlib.contextmanager
def together(world: World) -> Iterator[None]:
    """One setup step run by every rank (some ranks may do nothing in it) and ended together:
    if any rank raised, every rank raises :class:`MfcacheError` with the lowest failing rank's
    one line (its own message for an :class:`MfcacheError`, ``rank R failed: Type: message``
    for anything else, which that rank re-raises with its traceback). Its end is a barrier, so
    a step can stand for one: rank 0 makes something in one step, the others open it in the
    next. Every rank must run the same steps in the same order; without torchrun it is nothing."""
    if not world.enabled:
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as exc:  # reported to every rank below; BaseException (a signal) ends this rank alone
        failure = exc
    reports: list[str | None] = [None] * world.size
    dist.all_gather_object(reports, None if failure is None else _report(failure, world.rank))
    first = next((report for report in reports if report is not None), None)
    if failure is not None and not isinstance(failure, MfcacheError):
        raise failure  # a bug: its traceback on the rank it happened on, its line on the others
    if first is not None:
        raise MfcacheError(first)


def _report(failure: Exception, rank: int) -> str:
    """What the other ranks say of ``failure``: a user error's own message, a bug's one line."""
    if isinstance(failure, MfcacheError):
        return str(failure)
    line = (str(failure).strip().splitlines() or [""])[0]
    return f"rank {rank} failed: {type(failure).__name__}: {line} (its traceback is in rank {rank}'s output)"


def broadcast_from_main(value, world: World):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself without torchrun."""
    if not world.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
