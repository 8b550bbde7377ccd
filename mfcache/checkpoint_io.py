"""Reading torch files (detector ``.pth``, run checkpoints) without running code from them,
and writing checkpoints whole or not at all (:func:`save_checkpoint`).

``torch.load(weights_only=False)`` unpickles, and a pickle may call any function while it
loads: a ``.pth`` from a file-sharing link, or a run folder someone passed on, could take
over the machine. Every checkpoint mfcache reads therefore goes through
:func:`load_checkpoint`, which uses torch's weights-only unpickler: tensors, plain
containers (dict, list, tuple, set, OrderedDict, Counter), strings and numbers, plus only
the extra types the caller names (``allow``, e.g. ``argparse.Namespace`` for the released
H-DETR / DINO files). A file that asks for anything else is refused with one line naming
the type it asked for.

Trust is a scope the caller opens (:func:`trusting`; the CLI's ``--trust-checkpoint``), not
a parameter, because the files are read deep inside detector builders, the training loop
and data loaders. Inside it, files load with the full unpickler: the user has said the
file's source is trusted, and it may then run whatever the file contains.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mfcache.errors import MfcacheError, UntrustedFile
from mfcache.outputs import atomic_write

_TRUSTED = contextvars.ContextVar("mfcache_trusted_files", default=False)

# What torch's weights-only unpickler names in its refusals (torch/_weights_only_unpickler.py)
_ASKED_FOR = (
    re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)"),  # a class or function by name
    re.compile(r"unrecognized function (\S+)"),  # a call to a function it already holds
    re.compile(r"but got <class '([^']+)'>"),  # an object of a type it may not build
)


@contextlib.contextmanager
def trusting(enabled: bool = True) -> Iterator[None]:
    """Within this scope (when ``enabled``), checkpoint files and cached programs are
    trusted: loaded with the full unpickler, which runs any code they hold."""
    token = _TRUSTED.set(bool(enabled))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def files_trusted() -> bool:
    """Whether the current scope trusts the files it reads (see :func:`trusting`)."""
    return _TRUSTED.get()


def asked_for(error: Exception) -> str | None:
    """The type or function a weights-only load refused, parsed from torch's message
    (None: the file is damaged or not a pickle, rather than asking for a type)."""
    text = str(error)
    for pattern in _ASKED_FOR:
        found = pattern.search(text)
        if found:
            return found.group(1).rstrip(".,")
    return None


def load_checkpoint(
    path: str | Path, *, what: str, map_location: str | torch.device = "cpu", allow: Sequence[type] = ()
) -> object:
    """``torch.load(path)`` without running code from the file.

    Loads with ``weights_only=True`` and the extra types ``allow`` (nothing broader); a
    file needing anything else, or one that cannot be read at all, raises one
    :class:`MfcacheError` line naming ``what`` the file is, the file and, for a refused
    file, the type it asked for and the option that accepts it. Inside :func:`trusting`
    the file loads with the full unpickler."""
    if files_trusted():
        loader = contextlib.nullcontext()
        weights_only = False
    else:
        loader = torch.serialization.safe_globals(list(allow))
        weights_only = True
    try:
        with loader:
            return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and asked_for(exc):
            allowed = "".join(f", {t.__module__}.{t.__qualname__}" for t in allow)
            raise UntrustedFile(
                f"{what} {path} asks for {asked_for(exc)}, and loading that could run code from the file, so it "
                f"is refused (mfcache loads tensors, plain containers and numbers{allowed})"
            ) from None
        raise MfcacheError(_cannot_read(what, path, exc)) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt, truncated or foreign file is the user's to fix
        raise MfcacheError(_cannot_read(what, path, exc)) from None


def save_checkpoint(path: str | Path, payload: dict, *, what: str = "the checkpoint") -> None:
    """``torch.save`` of ``payload`` (tensors and plain containers only, so
    :func:`load_checkpoint` reads it back without any extra type) to ``path`` atomically: a
    kill or a full disk leaves the previous checkpoint intact, and a full disk is one line.
    Serialised in memory first: torch.save reports a failed file write as a RuntimeError."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(Path(path), buffer.getbuffer(), what)


def _cannot_read(what: str, path: str | Path, exc: Exception) -> str:
    inner = re.search(r"WeightsUnpickler error: (.+)", str(exc))  # torch wraps the reason in advice
    first = inner.group(1) if inner else (str(exc).strip().splitlines() or [""])[0]
    return f"cannot read {what} {path}: {type(exc).__name__}: {first}"


def _exported_record() -> Path:
    """This user's record of the programs their own extractions exported: one sha256 per line,
    under ``$XDG_STATE_HOME/mfcache`` (default ``~/.local/state/mfcache``), outside any cache,
    so a cache passed on by someone else cannot vouch for itself."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "mfcache" / "exported-programs.sha256"


def remember_exported(program: bytes) -> None:
    """Record that this user exported ``program`` (the bytes written into a cache)."""
    record = _exported_record()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with record.open("a") as f:
            f.write(hashlib.sha256(program).hexdigest() + "\n")
    except OSError:  # no writable home: such caches then need --trust-checkpoint, as others' do
        pass


def exported_here(program: bytes) -> bool:
    """Whether these exact bytes are a program this user's own extraction exported."""
    try:
        lines = _exported_record().read_text().split()
    except OSError:
        return False
    return hashlib.sha256(program).hexdigest() in lines
