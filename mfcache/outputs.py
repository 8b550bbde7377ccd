"""Where results go: output folders and files checked before the long work starts, and
write failures (a full disk, a read-only folder) turned into one-line errors.

A probe file, not ``os.access``, decides whether a folder is writable: it is also right for
read-only mounts, for network filesystems and for root (who passes every permission check).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mfcache.errors import MfcacheError


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(folder: Path, what: str) -> None:
    """Raise unless a file can be created (and removed) in the existing ``folder``."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mfcache-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise MfcacheError(f"cannot write {what} in {folder}: {_reason(exc)}") from None


def check_folder(path: Path, what: str) -> Path:
    """``path`` is (or can be created as) a folder this process can write in: not an existing
    file, and its nearest existing ancestor writable. Creates nothing. ``what`` names it in
    errors, e.g. ``"--out (the run folder)"``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MfcacheError(f"{what} {path} is a file; it must be a folder (or a path to create)")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise MfcacheError(f"{what} {path} cannot be created: {existing} is a file")
    _probe(existing, what)
    return path


def check_file(path: Path, what: str) -> Path:
    """``path`` can be written as a file: not an existing folder, and its folder exists or can
    be created, writable. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise MfcacheError(f"{what} {path} is a folder; it must be a file path (e.g. {path / 'metrics.json'})")
    check_folder(path.parent, what)
    return path


@contextlib.contextmanager
def write_errors(what: str, path: Path) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block (writing ``what`` to ``path``) into a
    one-line :class:`MfcacheError`."""
    try:
        yield
    except OSError as exc:
        raise MfcacheError(f"cannot write {what} to {path}: {_reason(exc)}") from None


def atomic_write(path: Path, data: bytes | memoryview, what: str, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder,
    then a rename, so a kill or a full disk leaves the previous file (or none) intact; a
    failure is one line naming ``what``. ``durable``: fsync before the rename (for files
    that mark something finished)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with write_errors(what, path):
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
