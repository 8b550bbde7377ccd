"""What ``mfcache predict`` writes for each image besides results.json: an overlay, and the
masks as PNGs.

The detections drawn or written here are those scoring at least the overlay threshold; each
is named by ``k``, its 1-based position among the image's entries in results.json (the
detector's order), so a PNG and its COCO result can be matched. Masks are pasted into the
image a chunk at a time (:meth:`~mfcache.stages.postprocess.Instances.mask_chunks`), never
all at once.

- ``overlays/<name>.png``: :func:`~mfcache.stages.visualize.overlay` (the best scores painted
  last, on top); RGBA with the input's own alpha channel when the input has one.
- ``--masks instance``: ``masks/<name>/<k>_<category>.png``, one 1-bit PNG per detection
  (the whole mask, overlaps not resolved); ``k`` zero-padded to 3 digits.
- ``--masks label``: ``masks/<name>.png``, one 16-bit grayscale PNG: each pixel holds the
  ``k`` of the detection drawn on top there in the overlay (the highest score), 0 where
  none; categories follow from results.json (entry ``k`` of the image).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mfcache.stages.postprocess import Instances
from mfcache.stages.visualize import instance_map, overlay_map, paint_order, palette, tag_texts

MASK_MODES = ("none", "instance", "label")
_INSTANCE_PNG = re.compile(r"^\d+_.*\.png$")  # what --masks instance writes: stale ones may be cleared


def planned_paths(name: str, *, overlays: bool, masks: str) -> dict[str, Path | None]:
    """``{"overlay": ..., "masks": ...}``: where, relative to the output folder, an image named
    ``name`` writes its overlay and its masks (the label PNG, or the folder of instance PNGs);
    None for what is not asked for. Known before any detection."""
    mask_path = {"label": Path("masks") / f"{name}.png", "instance": Path("masks") / name}.get(masks)
    return {"overlay": Path("overlays") / f"{name}.png" if overlays else None, "masks": mask_path}


def write_image_outputs(
    stage: Path,
    name: str,
    image: Tensor,
    found: Instances,
    *,
    score_threshold: float,
    overlays: bool = True,
    masks: str = "none",
    image_alpha: Tensor | None = None,
) -> int:
    """Write image ``name``'s overlay and mask PNGs (see the module docstring) under ``stage``
    for its detections ``found`` (all of them, in results.json order) scoring at least
    ``score_threshold``; ``image`` ``uint8 [3, H, W]``, ``image_alpha`` ``uint8 [H, W]`` or
    None. Returns how many detections were drawn."""
    positions = torch.nonzero(found.scores >= score_threshold).flatten()  # k - 1
    drawn = found[positions]
    if masks == "instance":
        _instance_pngs(stage / "masks" / name, drawn, positions + 1)
    if not overlays and masks != "label":
        return len(drawn)
    order = paint_order(drawn.scores, len(drawn))
    painted = drawn[order]
    top = instance_map((chunk for _, chunk in painted.mask_chunks()), found.image_size)
    if overlays:
        colors = palette(len(drawn))[order.numpy()]
        texts = tag_texts(drawn.names, drawn.scores)
        picture = overlay_map(
            image, top, painted.boxes, colors, [texts[i] for i in order.tolist()], image_alpha=image_alpha
        )
        _save(picture, stage / "overlays" / f"{name}.png")
    if masks == "label":
        ids = torch.cat([torch.zeros(1, dtype=torch.int64), positions[order] + 1])  # paint rank -> k
        _save(Image.fromarray(ids[top.long()].numpy().astype(np.uint16)), stage / "masks" / f"{name}.png")
    return len(drawn)


def _instance_pngs(folder: Path, drawn: Instances, ks: Tensor) -> None:
    """One 1-bit PNG per detection of ``drawn``: ``folder/<k>_<category>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = drawn.names
    for start, chunk in drawn.mask_chunks():
        for i, mask in enumerate(chunk, start=start):
            _save(Image.fromarray(mask.numpy()), folder / f"{int(ks[i]):03d}_{file_safe(names[i])}.png")


def file_safe(text: str) -> str:
    """``text`` as a file-name part: runs of anything but letters, digits, ``.``, ``_`` and
    ``-`` become ``_`` (``"traffic light"`` -> ``traffic_light``); never empty or hidden."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".") or "_"


def stale_instance_pngs(folder: Path) -> list[Path]:
    """The instance mask PNGs a previous run left in ``folder`` (files named as
    :func:`write_image_outputs` names them; nothing else)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and _INSTANCE_PNG.match(p.name)]


def _save(picture: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
