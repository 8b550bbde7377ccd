"""Where a cache lives: a local folder, or a prefix in object storage, parsed once.

:func:`locate` turns what the user typed (``--out``, ``--cache``, ``CACHE``) into a
:class:`CacheLocation`; the rest of the code asks it, instead of a ``Path``, to open the
cache's Zarr stores, to say whether a key exists, to list the splits and to take the
one-writer guard. A local folder (a path, or ``file://``) behaves exactly as a ``Path``
always did: ``zarr.storage.LocalStore``, an OS lock (:mod:`mfcache.cache.lock`), a free-space
check. ``s3://bucket/prefix``, ``gs://bucket/prefix`` and ``az://container/prefix`` go
through zarr's own store layer, :class:`zarr.storage.ObjectStore` on obstore (the ``s3``
extra); the writer guard there is a lease object (:mod:`mfcache.cache.lease`).

Why obstore rather than fsspec (s3fs): reading a zarr array of 128 KiB chunks from the
local S3 test server, ``zarr.storage.ObjectStore`` ran 4x faster than ``FsspecStore`` over
s3fs (33-38 vs 7-9 MB/s on the 2-core CI machine; ``benchmarks/remote_reader.py``): its
requests are made in Rust, outside the GIL the reader's CRC checks and training need.

Credentials come from each cloud's usual places and never from the URL: AWS from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), else the boto3
chain (``~/.aws/credentials``, ``~/.aws/config``, ``AWS_PROFILE``, SSO, instance roles);
``AWS_ENDPOINT_URL`` names an S3-compatible server (MinIO, Ceph), plain ``http://`` allowed.
Google Cloud from ``GOOGLE_APPLICATION_CREDENTIALS`` / ``GOOGLE_SERVICE_ACCOUNT`` or the
gcloud application-default credentials (a GCS emulator is reached the way object_store
documents: a service-account key with ``gcs_base_url`` and ``"disable_oauth": true`` in
``GOOGLE_SERVICE_ACCOUNT_KEY``, and ``GOOGLE_ALLOW_HTTP=true``; ``tests/helpers/gcs.py``); Azure from ``AZURE_STORAGE_ACCOUNT_NAME`` with
``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_KEY`` or the Azure CLI login. A URL
with a user name, password or query string is refused, so what is printed, stored in a run
folder or in metrics is the URL itself and never holds a secret.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zarr

from mfcache.errors import MfcacheError

# URL scheme -> obstore store kind
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "azure": "azure", "abfs": "azure"}
EXTRA = "pip install 'mfcache[s3]'"
REMOTE_CONCURRENCY = 64  # requests in flight to object storage (zarr's default, 10, is sized for a disk)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``500GB`` -> 500e9 bytes, ``2GiB`` -> 2 * 2**30, ``1000`` -> 1000 bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise MfcacheError(f"`local_cache_size` takes a size like 500GB, 64GiB or 800MB; got {text!r}")
    number, unit, binary = match.groups()
    power = "kmgtp".find(unit.lower()) + 1 if unit else 0
    return int(float(number) * ((1024 if binary else 1000) ** power))


@dataclass(frozen=True)
class ReadThrough:
    """A local folder that keeps copies of the chunks read from object storage, at most
    ``max_bytes`` in all (the least recently read go first): :mod:`mfcache.cache.readthrough`."""

    folder: Path
    max_bytes: int


def locate(
    where: str | Path | CacheLocation,
    *,
    local_cache: str | Path | None = None,
    local_cache_size: str | int | None = None,
) -> CacheLocation:
    """The :class:`CacheLocation` of ``where`` (a path, a ``file://`` URL or an object-store
    URL); ``local_cache``: a folder to keep read chunks in (object storage only), at most
    ``local_cache_size`` bytes (an int or a size like ``500GB``)."""
    if isinstance(where, CacheLocation):
        location = where
    else:
        location = _parse(where)
    if local_cache is None:
        if local_cache_size is not None:
            raise MfcacheError("`local_cache_size` needs `local_cache` DIR")
        return location
    if location.is_local:
        raise MfcacheError(
            f"`local_cache` keeps chunks read from object storage; cache {location} is a local "
            "folder already: leave `local_cache` out"
        )
    size = local_cache_size if isinstance(local_cache_size, int) else parse_size(local_cache_size or "100GB")
    if size <= 0:
        raise MfcacheError("`local_cache_size` must be more than 0")
    return CacheLocation(
        scheme=location.scheme,
        bucket=location.bucket,
        prefix=location.prefix,
        read_through=ReadThrough(Path(local_cache).expanduser(), size),
    )


def _parse(where: str | Path) -> CacheLocation:
    text = str(where)
    if isinstance(where, Path) or "://" not in text:
        return CacheLocation(path=Path(where))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise MfcacheError(f"{text}: file:// URLs name a local folder (file:///abs/path)")
        return CacheLocation(path=Path(parts.path))
    shown = f"{scheme}://{parts.hostname or ''}{parts.path}"  # never the user info or query
    if scheme not in SCHEMES:
        raise MfcacheError(f"{shown}: caches live in a local folder or at s3://, gs:// or az:// URLs")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise MfcacheError(
            f"{shown}: put credentials in the environment or the cloud's config files, "
            "not in the cache URL (it is printed and recorded in run folders)"
        )
    if not parts.hostname:
        raise MfcacheError(f"{text}: no bucket named; write {scheme}://BUCKET/PREFIX")
    return CacheLocation(scheme=scheme, bucket=parts.netloc, prefix=parts.path.strip("/"))


class CacheLocation:
    """A cache's place: ``path`` (a local folder) or ``scheme://bucket/prefix``.

    ``str()`` is what messages, run folders and metrics show: the path as given, or the URL
    (which holds no credentials, see :func:`locate`). Pickles as that: a DataLoader worker
    opens its own stores."""

    def __init__(
        self,
        *,
        path: Path | None = None,
        scheme: str = "",
        bucket: str = "",
        prefix: str = "",
        read_through: ReadThrough | None = None,
    ):
        self.path, self.scheme, self.bucket, self.prefix = path, scheme, bucket, prefix
        self.read_through = read_through
        self._object_store = None  # opened on first use, per process

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def url(self) -> str:
        return str(self.path) if self.is_local else f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"CacheLocation({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CacheLocation) and self.url == other.url and self.read_through == other.read_through

    def __hash__(self) -> int:
        return hash(self.url)

    def __getstate__(self):
        return {**self.__dict__, "_object_store": None}

    # ---- stores -------------------------------------------------------------------------

    def object_store(self):
        """The obstore store of a remote location (opened once per process). Raises zarr's
        request concurrency to ``REMOTE_CONCURRENCY``: each request waits a round trip, so a
        batch's reads (all issued at once by the reader) need many in flight."""
        if self._object_store is None:
            self._object_store = _open_object_store(self)
            if zarr.config.get("async.concurrency") < REMOTE_CONCURRENCY:
                zarr.config.set({"async.concurrency": REMOTE_CONCURRENCY})
        return self._object_store

    def store(self, *, read_only: bool) -> zarr.abc.store.Store:
        """The Zarr store of the whole cache (its root group at the store's root)."""
        if self.is_local:
            return zarr.storage.LocalStore(str(self.path), read_only=read_only)
        from zarr.storage import ObjectStore

        from mfcache.cache.lease import LeaseGuard

        store = ObjectStore(self.object_store(), read_only=read_only)
        return store if read_only else LeaseGuard(store, self)

    def strict_store(self, *, fresh: bool = False) -> zarr.abc.store.Store:
        """The read-only store the reader uses: a missing chunk is damage
        (:class:`~mfcache.cache.store.StrictStore`), chunks kept in the read-through folder
        when there is one (``fresh``: read from object storage and replace the local copy)."""
        from mfcache.cache.store import StrictStore, StrictWrapper

        if self.is_local:
            return StrictStore(self.path)
        store = self.store(read_only=True)
        if self.read_through is not None:
            from mfcache.cache.readthrough import ReadThroughStore

            store = ReadThroughStore(
                store,
                folder=self.read_through.folder / _slug(self),
                limit_folder=self.read_through.folder,
                max_bytes=self.read_through.max_bytes,
                fresh=fresh,
            )
        return StrictWrapper(store)

    def open_group(self, mode: str) -> zarr.Group:
        """The cache's root group (``mode`` as :func:`zarr.open_group`)."""
        if self.is_local:
            return zarr.open_group(str(self.path), mode=mode, zarr_format=3)
        return zarr.open_group(store=self.store(read_only=mode == "r"), mode=mode, zarr_format=3)

    # ---- keys ---------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        """Whether file/object ``key`` (relative to the cache root) exists."""
        if self.is_local:
            return (self.path / key).is_file()
        import obstore

        try:
            obstore.head(self.object_store(), key)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self.unreachable(exc) from None
        return True

    def has_node(self, name: str) -> bool:
        """Whether group or array ``name`` exists (local: its folder)."""
        return (self.path / name).is_dir() if self.is_local else self.has(f"{name}/zarr.json")

    def read(self, key: str) -> bytes | None:
        """The bytes of ``key``, or None where it does not exist."""
        if self.is_local:
            try:
                return (self.path / key).read_bytes()
            except FileNotFoundError:
                return None
        import obstore

        try:
            return obstore.get(self.object_store(), key).bytes().to_bytes()
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self.unreachable(exc) from None

    def children(self) -> list[str]:
        """The names of the folders (key prefixes) directly under the cache root, sorted."""
        if self.is_local:
            return sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []
        import obstore

        try:
            listed = obstore.list_with_delimiter(self.object_store(), None)
        except Exception as exc:
            raise self.unreachable(exc) from None
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed["common_prefixes"])

    def top_level(self) -> list[str]:
        """The names of everything directly under the cache root (files and folders)."""
        if self.is_local:
            return [p.name for p in self.path.iterdir()] if self.path.is_dir() else []
        import obstore

        try:
            listed = obstore.list_with_delimiter(self.object_store(), None)
        except Exception as exc:
            raise self.unreachable(exc) from None
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in listed["common_prefixes"]] + [
            o["path"].rsplit("/", 1)[-1] for o in listed["objects"]
        ]

    def is_cache(self) -> bool:
        """Whether a cache (its root metadata) exists here."""
        return self.has("zarr.json")

    def check_reachable(self) -> None:
        """Raise one line unless the bucket (container) exists and these credentials may list it."""
        if self.is_local:
            return
        import obstore

        try:
            next(iter(obstore.list(self.object_store(), None, chunk_size=1)), None)
        except Exception as exc:
            raise self.unreachable(exc) from None

    def unreachable(self, exc: BaseException) -> MfcacheError:
        """The one-line error for a failed request to the object store (no credentials in it)."""
        return MfcacheError(f"cannot reach {self}: {describe_store_error(exc)}")


def describe_store_error(exc: BaseException) -> str:
    """A failed object-store request in a few words: what the store said, first line only."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lower = str(exc).lower()
    if "nosuchbucket" in lower or "bucket does not exist" in lower or "specified bucket" in lower:
        return "the bucket does not exist"
    if "invalidaccesskeyid" in lower or "signaturedoesnotmatch" in lower or "unauthenticated" in lower:
        return "the credentials were refused (check AWS_ACCESS_KEY_ID / the profile in use)"
    if "accessdenied" in lower or isinstance(exc, PermissionError):
        return "access denied by the store"
    return f"{type(exc).__name__}: {text[:300]}"


def _slug(location: CacheLocation) -> str:
    """The read-through subfolder of one cache: its URL made a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", location.url)


def _open_object_store(location: CacheLocation):
    try:
        import obstore.store as obs
    except ImportError:
        raise MfcacheError(f"cache {location} is in object storage: install its support with {EXTRA}") from None
    kind = SCHEMES[location.scheme]
    prefix = location.prefix or None
    if kind == "s3":
        options, provider = {}, None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if endpoint.startswith("http://"):
            options["allow_http"] = True  # an S3-compatible server on the cluster's own network
        if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_SKIP_SIGNATURE")):
            provider = _boto3_credentials(location)
        try:
            return obs.S3Store(
                location.bucket, prefix=prefix, client_options=options or None, credential_provider=provider
            )
        except Exception as exc:
            raise MfcacheError(f"cannot open {location}: {describe_store_error(exc)}") from None
    try:
        if kind == "gcs":
            return obs.GCSStore(location.bucket, prefix=prefix)
        return obs.AzureStore(location.bucket, prefix=prefix)
    except Exception as exc:
        raise MfcacheError(f"cannot open {location}: {describe_store_error(exc)}") from None


def _boto3_credentials(location: CacheLocation):
    """Credentials from boto3's chain (config files, profiles, SSO, instance roles), or a
    one-line error naming where they are looked for."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        boto3 = None
    session = boto3.Session() if boto3 is not None else None
    if session is None or session.get_credentials() is None:
        raise MfcacheError(
            f"no AWS credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or a profile in ~/.aws/credentials (AWS_PROFILE)"
        )
    return Boto3CredentialProvider(session)
