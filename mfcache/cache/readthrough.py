"""A local folder of chunks read from object storage (``--local-cache DIR --local-cache-size 500GB``).

:class:`ReadThroughStore` wraps the reader's store: a chunk read from object storage is also
written to ``DIR/<cache url as a name>/<key>``, and read from there the next time (the next
epoch, the next run, another DataLoader worker). Only data chunks are kept: never metadata
(``zarr.json``) nor the ``index/`` arrays, which change while a split is being extracted; a
data chunk is written once, with its block, before the block's done flags, and the reader
reads only done images. What comes from the local copy is checked exactly like what comes
from object storage (CRC-32 per part): a copy that fails is read from object storage again
and replaced (:meth:`mfcache.cache.reader.CacheSplit.read_many`).

The folder holds at most ``max_bytes`` (all caches in it together): past that, the files read
longest ago are removed (a read touches the file's mtime). Several processes may share the
folder: files are written under a temporary name and renamed, and each process re-counts the
folder after writing 5% of the limit, so it overshoots by at most 5% per process.

Why not zarr's or fsspec's: ``zarr.experimental.cache_store.CacheStore`` keeps its size
accounting in the memory of one process (DataLoader workers and later runs would each
think the folder empty and fill it past the limit), and fsspec's ``filecache`` has no size
limit and works below fsspec only, not below obstore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from pathlib import Path

from zarr.storage import WrapperStore

_DATA_CHUNK = re.compile(r"(^|/)c(/\d+)+$")
_CHANGING = re.compile(r"(^|/)index/")  # written while the split is extracted: always read from the store
_TMP = ".part-"


class ReadThroughStore(WrapperStore):
    """``store`` (read-only) with its data chunks kept in ``folder`` (``limit_folder``, the
    folder all caches share, holds at most ``max_bytes``); ``fresh``: read from ``store``
    every time, replacing the local copy."""

    def __init__(self, store, *, folder: Path, limit_folder: Path, max_bytes: int, fresh: bool = False):
        super().__init__(store)
        self.folder, self.limit_folder, self.max_bytes, self.fresh = Path(folder), Path(limit_folder), max_bytes, fresh
        self.hits = self.misses = 0
        self._written = 0  # bytes this process wrote since it last counted the folder
        self._lock = threading.Lock()

    def _with_store(self, store):
        return type(self)(
            store, folder=self.folder, limit_folder=self.limit_folder, max_bytes=self.max_bytes, fresh=self.fresh
        )

    def __getstate__(self):
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def kept(key: str) -> bool:
        """Whether chunk ``key`` is kept locally: data chunks, not the index."""
        return bool(_DATA_CHUNK.search(key)) and not _CHANGING.search(key)

    async def get(self, key, prototype, byte_range=None):
        if byte_range is not None or not self.kept(key):
            return await self._store.get(key, prototype, byte_range)
        local = self.folder / key
        if not self.fresh:
            data = await asyncio.to_thread(_read_local, local)  # off the event loop: reads overlap
            if data is not None:
                self.hits += 1
                return prototype.buffer.from_bytes(data)
        self.misses += 1
        value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            await asyncio.to_thread(self._keep, local, value.to_bytes())
        return value

    def _keep(self, local: Path, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}{_TMP}{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, local)  # never a half-written file under the real name
        except OSError:
            return  # a full or read-only disk: read from the store, as without the folder
        with self._lock:
            self._written += len(data)
            due = self._written >= self.max_bytes // 20
            if due:
                self._written = 0
        if due:
            trim(self.limit_folder, self.max_bytes)


def _read_local(local: Path) -> bytes | None:
    try:
        data = local.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    with contextlib.suppress(OSError):
        os.utime(local)  # most recently read: removed last
    return data


def folder_files(folder: Path) -> list[tuple[float, int, Path]]:
    """``(mtime, size, path)`` of every file under ``folder``."""
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append((st.st_mtime, st.st_size, path))
    return found


def trim(folder: Path, max_bytes: int) -> int:
    """Remove the files read longest ago until ``folder`` holds at most 90% of ``max_bytes``
    (room to go on) when it holds more than ``max_bytes``. Returns the bytes it holds."""
    files = folder_files(folder)
    total = sum(size for _, size, _ in files)
    if total <= max_bytes:
        return total
    for _, size, path in sorted(files):
        if total <= 0.9 * max_bytes:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
    return total
