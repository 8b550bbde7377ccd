"""One writer per cache in object storage: a lease object, ``CACHE/.mfcache.lease``.

Object stores have no ``flock``. The writer (rank 0 of a torchrun job, for the whole job:
:func:`mfcache.cache.lock.writer_lock`) creates the lease object with a conditional write
(``If-None-Match: *``, obstore's ``mode="create"``), so of two extracts started together
exactly one gets it; the other is refused with one line naming the holder (owner token, host,
pid, command) and when its lease expires. The holder renews the lease every ``RENEW``
seconds from a thread (a conditional write on the version it wrote last, so a lease taken over
is noticed, not overwritten: S3 and Azure match its ETag, Google Cloud Storage its generation,
so both are kept, :func:`_version`); a writer that could not renew for ``TTL - RENEW`` seconds
stops writing (:class:`LeaseGuard` refuses every write), before anyone else may take the lease.

A killed writer leaves its lease behind: it expires ``TTL`` seconds after its last renewal, and
the same command on the same host takes it over at once when the process named in it is gone
(as an OS lock would be dropped). Inside the lease, blocks need no lock: each rank writes whole
blocks nobody else writes (:func:`mfcache.stages.extract.own_blocks`) and sets a block's done
flags only after its data and checksums, so a killed node's blocks read as not done and the
next run redoes them; an object is written whole or not at all, so nothing half-written is
ever read.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from zarr.storage import WrapperStore

from mfcache.errors import MfcacheError

LEASE_NAME = ".mfcache.lease"
TTL = 120.0  # seconds a lease lasts after its last renewal
RENEW = 20.0  # seconds between renewals
_HELD: dict[str, Lease] = {}  # location url -> the lease this process holds


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """The lease this process holds on a cache in object storage; :meth:`release` it."""

    def __init__(self, location, info: dict, version: dict | None):
        self.location, self.info, self._version = location, info, version
        self._deadline = time.monotonic() + TTL - RENEW  # writes stop before the lease can lapse
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="mfcache-lease", daemon=True)
        self._thread.start()
        _HELD[location.url] = self

    def check(self) -> None:
        """Raise unless the lease is still this process's (a write may go ahead)."""
        if self._lost is None and time.monotonic() > self._deadline:
            self._lost = f"it could not be renewed for {TTL - RENEW:.0f} s"
        if self._lost is not None:
            raise MfcacheError(
                f"lost the writer lease of cache {self.location} ({self._lost}); finished blocks "
                "are kept: run the same command again to resume"
            )

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW):
            try:
                self.renew()
            except _Taken:
                return
            except Exception:  # a network blip: tried again at the next renewal
                pass

    def renew(self) -> None:
        """Push the expiry ``TTL`` seconds on, if the lease is still ours."""
        import obstore

        info = {**self.info, "expires": time.time() + TTL}
        info["expires_utc"] = _utc(info["expires"])
        started = time.monotonic()
        try:
            result = obstore.put(
                self.location.object_store(),
                LEASE_NAME,
                json.dumps(info).encode(),
                mode=self._version or "overwrite",
            )
        except (obstore.exceptions.PreconditionError, FileNotFoundError):
            self._lost = "another writer took it over"
            raise _Taken(self._lost) from None
        self.info, self._version = info, _version(result)
        self._deadline = started + TTL - RENEW

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still ours."""
        import obstore

        self._stop.set()
        _HELD.pop(self.location.url, None)
        held = _read(self.location)
        if held is not None and held[0].get("owner") == self.info["owner"]:
            try:
                obstore.delete(self.location.object_store(), LEASE_NAME)
            except Exception:
                pass  # it expires by itself


class _Taken(Exception):
    pass


def _version(meta) -> dict | None:
    """What a conditional update of the object that ``meta`` (a put's result, a get's or head's
    metadata) describes must match: obstore's ``UpdateVersion``, with the ETag (S3, Azure) and
    the version (Google Cloud Storage's generation, ``x-goog-if-generation-match``: object_store
    refuses an update on GCS without it); None where the store gave neither."""
    version = {key: meta[key] for key in ("e_tag", "version") if meta.get(key)}
    return version or None


def _read(location) -> tuple[dict, dict | None] | None:
    """The lease object's contents and version (:func:`_version`), or None where there is none."""
    import obstore

    try:
        result = obstore.get(location.object_store(), LEASE_NAME)
        data, version = result.bytes().to_bytes(), _version(result.meta)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise location.unreachable(exc) from None
    try:
        info = json.loads(data)
    except ValueError:
        info = None
    return (info if isinstance(info, dict) else {}), version


def _this_process() -> dict:
    now = time.time()
    return {
        "owner": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _utc(now),
        "expires": now + TTL,
        "expires_utc": _utc(now + TTL),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
    }


def _gone(info: dict) -> str | None:
    """Why lease ``info`` may be taken over (expired, or its process on this host ended), or None."""
    if float(info.get("expires", 0)) < time.time():
        return "expired"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return "its process has ended"
        except PermissionError:
            return None
        return None
    return None


def acquire_lease(location) -> Lease:
    """Take the writer lease of cache ``location`` (object storage), or raise one line
    naming its holder and when the lease expires."""
    import obstore

    location.check_reachable()
    check_out_prefix(location)
    store = location.object_store()
    info = _this_process()
    body = json.dumps(info).encode()
    try:
        result = obstore.put(store, LEASE_NAME, body, mode="create")
    except obstore.exceptions.AlreadyExistsError:
        held = _read(location)
        if held is None:  # released between the two requests: try once more
            return acquire_lease(location)
        holder, version = held
        why = _gone(holder)
        if why is None:
            raise MfcacheError(
                f"cache {location} is being written by another extract ({_describe(holder)}); "
                f"its lease expires at {holder.get('expires_utc', '?')} unless renewed: wait for "
                "it to finish, or choose another `extract.out`"
            ) from None
        try:  # take over the stale lease, unless someone else just did
            result = obstore.put(store, LEASE_NAME, body, mode=version or "overwrite")
        except obstore.exceptions.PreconditionError:
            raise MfcacheError(
                f"cache {location} was just taken by another extract; wait for it to finish, or choose another `extract.out`"
            ) from None
        except Exception as exc:
            raise location.unreachable(exc) from None
    except obstore.exceptions.NotSupportedError:  # a store without conditional writes: last writer wins
        result = obstore.put(store, LEASE_NAME, body)
    except Exception as exc:
        raise location.unreachable(exc) from None
    held = _read(location)  # a store that ignored the condition: whoever wrote last holds it
    if held is None or held[0].get("owner") != info["owner"]:
        raise MfcacheError(
            f"cache {location} was just taken by another extract "
            f"({_describe(held[0]) if held else 'unknown'}); choose another `extract.out`"
        )
    return Lease(location, info, _version(result))


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: {info.get('command')}"


def check_out_prefix(location) -> None:
    """Refuse an ``--out`` prefix that holds something other than an mfcache cache (an empty
    prefix, or one with only a lease in it, becomes one)."""
    if location.is_cache():
        return
    other = [name for name in location.top_level() if name != LEASE_NAME]
    if other:
        raise MfcacheError(
            f"{location} exists and is not an mfcache cache (it holds {other[0]}); choose another `extract.out`"
        )


def held_lease(location) -> Lease | None:
    return _HELD.get(location.url)


class LeaseGuard(WrapperStore):
    """A writable store that refuses every write once this process has lost the cache's
    lease (:meth:`Lease.check`); a process holding no lease (a torchrun rank other than 0,
    whose job rank 0 holds it for) writes freely."""

    def __init__(self, store, location):
        super().__init__(store)
        self._location = location

    def _with_store(self, store):
        return type(self)(store, self._location)

    def _check(self) -> None:
        lease = _HELD.get(self._location.url)
        if lease is not None:
            lease.check()

    async def set(self, key, value):
        self._check()
        await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        self._check()
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values):
        self._check()
        await self._store._set_many(values)

    async def delete(self, key):
        self._check()
        await self._store.delete(key)

    async def delete_dir(self, prefix):
        self._check()
        await self._store.delete_dir(prefix)
