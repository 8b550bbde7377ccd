"""What ``mfcache predict`` reads: the image files its arguments name, and the output name each
one gets.

A file argument is read as it is (whatever its suffix); a folder contributes its image files
(by suffix, :data:`IMAGE_SUFFIXES`), sorted by path. Folders are read one level deep unless
``recursive`` (as detectron2's demo and ultralytics read a folder): then every subfolder too,
except hidden ones (``.git``, ``.ipynb_checkpoints``, predict's own staging folders), links to
folders (no loops) and the output folder itself, so predicting into ``photos/predictions``
does not read the previous run's overlays.

Output names keep a folder argument's relative path without the suffix (``photos/a/1.jpg`` ->
``a/1``), so same-named files in different subfolders do not collide; a name that is still
taken (``1.jpg`` next to ``1.png``, or two folder arguments holding ``1.jpg``) gets
``-<image_id>`` appended.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mfcache.errors import MfcacheError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageInput:
    """One image to predict on: ``image_id`` (1..N in input order), its ``path`` and ``name``,
    the unique output name without suffix (a relative POSIX path: ``a/1``)."""

    image_id: int
    path: Path
    name: str


def find_images(
    inputs: Sequence[str | Path], *, recursive: bool = False, exclude: str | Path | None = None
) -> list[ImageInput]:
    """The images ``inputs`` (files and folders) name, in order, with unique output names;
    ``exclude``: a folder never read (the output folder). One error line for a missing
    argument or when no image is found."""
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [
                (path, path.relative_to(item).with_suffix("").as_posix())
                for path in folder_images(item, recursive=recursive, exclude=skip)
            ]
        elif item.is_file():
            found.append((item, item.stem))
        else:
            raise MfcacheError(f"no such image or folder: {item}")
    if not found:
        nested = not recursive and any(p.is_dir() and any(c.is_dir() for c in p.iterdir()) for p in map(Path, inputs))
        hint = " (its subfolders are read with `predict.recursive`)" if nested else ""
        raise MfcacheError(f"no image files in {', '.join(map(str, inputs)) or 'the arguments'}{hint}")
    seen: set[str] = set()
    images = []
    for image_id, (path, name) in enumerate(found, start=1):
        name = name if name not in seen else f"{name}-{image_id}"
        seen.add(name)
        images.append(ImageInput(image_id=image_id, path=path, name=name))
    return images


def folder_images(folder: Path, *, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Image files (by suffix) in ``folder``, and with ``recursive`` in its subfolders (not
    hidden ones, not links to folders, not ``exclude``, a resolved path), sorted by their
    path relative to ``folder``."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    paths = []
    for root, dirs, files in os.walk(folder):  # links to folders are listed, never entered
        here = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (here / d).resolve() != exclude]
        paths += [here / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES and (here / f).is_file()]
    return sorted(paths, key=lambda p: p.relative_to(folder).parts)
