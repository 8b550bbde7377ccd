"""Output paths that stay inside the folder the user named.

A name built from input data (an image's file name, an id) or a link left in an output
folder must not make mfcache write elsewhere: :func:`inside` resolves the path (following
links) and refuses it unless it lies under the folder.
"""

from __future__ import annotations

from pathlib import Path

from mfcache.errors import MfcacheError


def inside(folder: str | Path, name: str | Path, *, what: str) -> Path:
    """``folder / name``; one :class:`MfcacheError` line if it resolves outside ``folder``
    (an absolute ``name``, ``..`` parts, or a link inside ``folder`` pointing out of it)."""
    folder = Path(folder)
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise MfcacheError(
            f"{what} {name} would be written outside {folder} (to {path.resolve()}); "
            "remove the link or choose another output folder"
        )
    return path
