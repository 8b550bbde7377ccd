"""One writer per cache: an OS lock on ``CACHE/.mfcache.lock``, held for a whole extraction.

Two extractions into one cache would race on its layout and shards (zarr loses data
silently when two processes write one shard), so a second writer is refused at once, with
one line naming the process that holds the cache. The lock is ``fcntl.flock`` on a file in
the cache folder: the OS drops it when its process ends, however it ends, so a killed run
leaves no stale lock (the file stays, naming the last holder, and is simply locked again).
A torchrun job is one writer: rank 0 takes the lock and every rank learns the outcome
(:func:`writer_lock`). Readers (train, eval, verify) take no lock: a split still being
written reads as incomplete and is refused by ``CacheSplit.require_complete``.

A forked child (a DataLoader worker) would share the lock and keep it alive after its
parent is killed, so children close their copy at fork; exec'd programs never inherit it.
Linux emulates ``flock`` with byte-range locks on NFS, so the lock holds across hosts there;
on a file system without locks, extract refuses to start rather than run unguarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from mfcache.distributed import World, broadcast_from_main
from mfcache.errors import MfcacheError

LOCK_NAME = ".mfcache.lock"
_HELD: set[int] = set()  # lock file descriptors this process holds


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's lock stays: flock belongs to the open file, closed here only
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def check_out_folder(path: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder holding something other than an
    mfcache cache (an empty folder, or one with only a cache lock in it, becomes one)."""
    if path.exists() and not path.is_dir():
        raise MfcacheError(f"{path} is a file, not a cache folder; choose another `extract.out`")
    if path.is_dir() and not (path / "zarr.json").exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise MfcacheError(f"{path} exists and is not an mfcache cache; choose another `extract.out`")


class CacheLock:
    """The held lock of cache ``path``: :meth:`release` it (or end the process)."""

    def __init__(self, path: Path, fd: int, created: bool):
        self.path, self._fd, self._created = path, fd, created

    def release(self) -> None:
        """Unlock; if no cache was made after all (an error before anything was written),
        remove the lock file, and the folder if this lock created it."""
        if self._fd < 0:
            return
        if not (self.path / "zarr.json").exists():  # still ours: nobody else can hold it yet
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
            if self._created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
        _HELD.discard(self._fd)
        os.close(self._fd)  # drops the flock
        self._fd = -1


def acquire(path: str | Path) -> CacheLock:
    """Lock cache folder ``path`` for writing (creating the folder if needed), or raise a
    one-line :class:`MfcacheError` naming the process that holds it (pid, host, start time)."""
    path = Path(path)
    lock_file = path / LOCK_NAME
    check_out_folder(path)
    for _ in range(20):  # retried only if a finishing holder removed the file under us
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise MfcacheError(f"cannot create the cache lock {lock_file}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise MfcacheError(
                f"cache {path} is being written by another extract ({holder}); wait for it to "
                "finish, or choose another `extract.out`"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise MfcacheError(
                f"cannot lock {lock_file} ({exc.strerror or exc}): this file system has no "
                "file locks; write the cache on a local disk"
            ) from None
        try:  # the file locked must still be the one at the path, not one a finishing holder removed
            current = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_this_process()).encode(), 0)
            _HELD.add(fd)
            return CacheLock(path, fd, created)
        os.close(fd)
    raise MfcacheError(f"cannot lock {lock_file}: it keeps being removed; is another program deleting {path}?")


@contextlib.contextmanager
def writer_lock(path, world: World) -> Iterator[CacheLock | None]:
    """Hold the lock of cache ``path`` (a folder, or a :class:`~mfcache.cache.location.CacheLocation`)
    for the body: rank 0 takes it before anything is created, and every rank of a torchrun job
    gets the same one-line error if it is refused (no rank is left waiting). In object storage
    the lock is a lease object (:mod:`mfcache.cache.lease`). Yields the lock on rank 0, None on
    the other ranks."""
    from mfcache.cache.lease import acquire_lease
    from mfcache.cache.location import locate

    location = locate(path)
    lock, refusal = None, None
    if world.is_main:
        try:
            lock = acquire(location.path) if location.is_local else acquire_lease(location)
        except MfcacheError as exc:
            refusal = str(exc)
    refusal = broadcast_from_main(refusal, world)
    if refusal is not None:
        raise MfcacheError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _this_process() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
    }


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file (it writes right after
    locking: wait a moment for it)."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            info = None
        if isinstance(info, dict) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not isinstance(info, dict):
        return "a process that has not said which yet"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: {info.get('command')}"
