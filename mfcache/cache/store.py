"""Reading a cache's Zarr store strictly: a missing chunk is damage, never zeros.

zarr reads an absent chunk as the array's fill value. The writer writes every chunk of every
block (empty ones included), so in a cache an absent chunk can only mean a lost file:
:class:`StrictStore` refuses it (:class:`MissingChunk`), and :func:`damage` puts any read
failure into the few words the one-line errors of the reader and ``mfcache verify`` use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from zarr.storage import LocalStore, WrapperStore

_CHUNK_KEY = re.compile(r"(^|/)c(/\d+)+$")  # zarr v3 default chunk keys: <array>/c/<i>/<j>...
# A block's flags and checksums are written with its data: until then their chunks are absent
# and read as 0, which means "not written" (such images are never served; a written image whose
# checksum chunk is lost fails its checks: its parts do not all have a CRC-32 of 0).
_WRITTEN_LATER = re.compile(r"(^|/)index/(done|checksum)/c/")


class MissingChunk(Exception):
    """A chunk file that extraction wrote is gone (``key`` relative to the cache root)."""

    def __init__(self, key: str):
        super().__init__(f"chunk file {key} is missing")
        self.key = key


class StrictStore(LocalStore):
    """A read-only local store that raises :class:`MissingChunk` for an absent chunk.

    zarr reads an absent chunk as the array's fill value (zeros), which would serve data
    nobody wrote; the writer writes every chunk of every block (empty ones included), so in
    a cache an absent chunk is always damage. Costs nothing: zarr already asked for the file."""

    def __init__(self, root: str | Path):
        super().__init__(root, read_only=True)

    async def get(self, key: str, prototype=None, byte_range=None):
        return _refuse_missing(key, await super().get(key, prototype, byte_range))


class StrictWrapper(WrapperStore):
    """:class:`StrictStore` for any store (object storage): an absent chunk raises
    :class:`MissingChunk` instead of reading as zeros."""

    async def get(self, key: str, prototype=None, byte_range=None):
        return _refuse_missing(key, await self._store.get(key, prototype, byte_range))


def _refuse_missing(key: str, value):
    if value is None and _CHUNK_KEY.search(key) and not _WRITTEN_LATER.search(key):
        raise MissingChunk(key)
    return value


def damage(exc: BaseException) -> str:
    """What went wrong reading a chunk or metadata file, in a few words."""
    if isinstance(exc, MissingChunk):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"is not valid JSON ({exc})"
    return f"unreadable ({type(exc).__name__}: {exc})"
