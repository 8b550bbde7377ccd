"""Pictures of instance masks: coloured overlays on the image and GT | prediction panels.

Conventions: an image is ``uint8 [3, H, W]`` RGB; masks are ``bool [N, H, W]`` in the
image's pixels; boxes are ``[N, 4]`` xyxy continuous pixel coordinates (pixel ``i`` covers
``[i, i + 1)``), as everywhere in mfcache. Instance ``i`` is drawn in ``palette(N)[i]``
(deterministic); a later instance is painted over an earlier one where they overlap, so
pass them in ascending score order to keep the best on top (:func:`overlay` does this
itself when given scores).

Everything an overlay draws stays inside the union of the masks and boxes: fills and
outlines are the masks', box frames are drawn on the boxes' edge pixels and labels
(``"name 0.87"``) sit inside each box's top-left corner, clipped to the box.
"""

from __future__ import annotations

import colorsys
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mfcache.data.labels import AGNOSTIC_CATEGORY
from mfcache.data.segmentation import segmentation_rle
from mfcache.data.transforms import load_image
from mfcache.errors import MfcacheError
from mfcache.paths import inside

__all__ = [
    "decode_results",
    "instance_map",
    "label_edges",
    "overlay",
    "overlay_map",
    "paint_order",
    "palette",
    "side_by_side",
    "tag_texts",
    "visualize_split",
]

_GOLDEN = 0.618033988749895


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 RGB colours, well separated and the same for every call: hues step
    by the golden ratio, saturation and value alternate so neighbours differ in brightness too."""
    hues = (np.arange(n) * _GOLDEN + 0.1) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.85 if i % 2 else 0.65, 0.95 if i % 3 else 0.8) for i, h in enumerate(hues)]
    return np.round(np.asarray(rgb, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def label_edges(labels: Tensor, width: int = 1) -> Tensor:
    """``[H, W]`` integer label map (0 = background) -> ``[H, W]`` bool: labelled pixels
    within ``width`` px of a pixel with another label, i.e. each region minus its erosion by
    a ``(2 width + 1)``-square (max- and min-pooling the map). The image border is not an edge:
    max_pool2d pads with -inf, which never differs from a label in the max (nor, negated, in the min).

    Only the window around the labelled pixels (``width`` px beyond them) is pooled: outside
    it nothing is labelled, and inside it every neighbourhood is the whole map's, so a few
    small instances on a 12-megapixel photo cost a small window, not four float copies of it."""
    out = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    rows, cols = torch.nonzero(labels.any(1)).flatten(), torch.nonzero(labels.any(0)).flatten()
    if not len(rows):
        return out
    r0, r1 = max(0, int(rows[0]) - width), min(labels.shape[0], int(rows[-1]) + 1 + width)
    c0, c1 = max(0, int(cols[0]) - width), min(labels.shape[1], int(cols[-1]) + 1 + width)
    window = labels[r0:r1, c0:c1]
    x = window[None, None].float()
    k = 2 * width + 1
    hi = F.max_pool2d(x, k, stride=1, padding=width)
    lo = -F.max_pool2d(-x, k, stride=1, padding=width)
    out[r0:r1, c0:c1] = ((hi != x) | (lo != x))[0, 0] & (window > 0)
    return out


def _font(height: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, round(height / 40)))


def overlay(
    image: Tensor,
    masks: Tensor,
    boxes: Tensor,
    labels: Sequence[str],
    scores: Tensor | None = None,
    *,
    alpha: float = 0.5,
    outline: int = 2,
    colors: np.ndarray | None = None,
    image_alpha: Tensor | None = None,
) -> Image.Image:
    """Draw N instances on ``image`` and return a PIL image of the same size: RGB, or RGBA
    carrying ``image_alpha`` (``uint8 [H, W]``, the input's own alpha channel) unchanged.

    image ``uint8 [3, H, W]``; masks ``[N, H, W]`` bool; boxes ``[N, 4]`` xyxy pixels;
    labels N names; scores ``[N]`` or None (then labels are drawn alone).
    Each instance gets ``colors[i]`` (default ``palette(N)``): its mask blended at ``alpha``,
    a solid ``outline``-px line along the mask boundary, a 1-px box frame and a label
    ``"name 0.87"`` on a tag inside the box's top-left corner. With scores, higher scores
    are painted last (on top); outlines follow what is visible of each mask.
    """
    n = masks.shape[0]
    height, width = image.shape[1:]
    if masks.shape[1:] != (height, width) or boxes.shape != (n, 4) or len(labels) != n:
        raise ValueError(
            f"image {tuple(image.shape)}, masks {tuple(masks.shape)}, boxes {tuple(boxes.shape)} "
            f"and {len(labels)} labels disagree"
        )
    colors = palette(n) if colors is None else np.asarray(colors, dtype=np.uint8)
    order = paint_order(scores, n)
    texts = tag_texts(labels, scores)
    top = instance_map([masks.cpu().bool()[order]], (height, width))
    return overlay_map(
        image,
        top,
        boxes[order],
        colors[order.numpy()],
        [texts[i] for i in order.tolist()],
        alpha=alpha,
        outline=outline,
        image_alpha=image_alpha,
    )


def paint_order(scores: Tensor | None, n: int) -> Tensor:
    """``[n]`` indices in the order instances are painted: ascending score (the best on top),
    ties in their given order; the given order without scores."""
    return torch.argsort(scores.detach().cpu(), stable=True) if scores is not None else torch.arange(n)


def tag_texts(labels: Sequence[str], scores: Tensor | None) -> list[str]:
    """Each instance's tag: ``"name 0.87"``, or the name alone without scores."""
    if scores is None:
        return list(labels)
    return [f"{name} {float(score):.2f}" for name, score in zip(labels, scores.detach().cpu().tolist())]


def instance_map(chunks: Iterable[Tensor], image_hw: tuple[int, int]) -> Tensor:
    """Masks in paint order, given as consecutive chunks ``[n, H, W]`` bool -> ``[H, W]``
    int32: 1 + the index of the last mask covering each pixel, 0 where none covers it. Holds
    one chunk at a time (not an int32 copy of every mask)."""
    top = torch.zeros(image_hw, dtype=torch.int32)
    seen = 0
    for chunk in chunks:
        for i, mask in enumerate(chunk.cpu().bool()):
            top.masked_fill_(mask, seen + i + 1)
        seen += chunk.shape[0]
    return top


def overlay_map(
    image: Tensor,
    top: Tensor,
    boxes: Tensor,
    colors: np.ndarray,
    texts: Sequence[str],
    *,
    alpha: float = 0.5,
    outline: int = 2,
    image_alpha: Tensor | None = None,
) -> Image.Image:
    """:func:`overlay` from the instances' :func:`instance_map` ``top [H, W]`` (instance
    ``i`` = value ``i + 1``, in paint order), with ``boxes [N, 4]``, ``colors [N, 3]`` uint8
    and tag ``texts`` in that same order. Blends in uint8 except on the covered pixels, so a
    large photo costs a few bytes per pixel."""
    height, width = image.shape[1:]
    n = boxes.shape[0]
    color = torch.from_numpy(np.asarray(colors, dtype=np.uint8)).float() if n else torch.zeros(0, 3)
    filled = top > 0
    lined = label_edges(top, width=outline)  # the outline of every visible region
    palette_ext = torch.cat([torch.zeros(1, 3), color])  # index 0 = no instance
    pixels = image.permute(1, 2, 0).contiguous()  # [H, W, 3] uint8
    blend = (1 - alpha) * pixels[filled].float() + alpha * palette_ext[top[filled].long()]
    pixels[filled] = blend.round().clamp(0, 255).to(torch.uint8)
    pixels[lined] = palette_ext[top[lined].long()].to(torch.uint8)
    canvas = Image.fromarray(pixels.numpy(), "RGB")

    draw = ImageDraw.Draw(canvas)
    font = _font(min(height, width))
    for (x0, y0, x1, y1), rgb, text in zip(boxes.cpu().float().tolist(), color.to(torch.uint8).tolist(), texts):
        # Pixels whose centres lie in the box: columns [round(x0), round(x1)), same for rows.
        c0, r0 = max(0, round(x0)), max(0, round(y0))
        c1, r1 = min(width, round(x1)) - 1, min(height, round(y1)) - 1
        if c1 < c0 or r1 < r0:
            continue
        draw.rectangle([c0, r0, c1, r1], outline=tuple(rgb), width=1)
        _draw_tag(canvas, (c0, r0, c1, r1), text, tuple(rgb), font)
    if image_alpha is not None:
        canvas.putalpha(Image.fromarray(image_alpha.cpu().numpy(), "L"))
    return canvas


def _draw_tag(canvas: Image.Image, box: tuple[int, int, int, int], text: str, rgb: tuple, font) -> None:
    """A filled label tag at the top-left inside ``box`` (inclusive pixel bounds), clipped to it."""
    c0, r0, c1, r1 = box
    left, top, right, bottom = font.getbbox(text)
    tag_w, tag_h = min(right + 4, c1 - c0 + 1), min(bottom + 3, r1 - r0 + 1)
    tag = Image.new("RGB", (tag_w, tag_h), rgb)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    ImageDraw.Draw(tag).text((2, 1), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    canvas.paste(tag, (c0, r0))


def side_by_side(
    left: Image.Image, right: Image.Image, titles: tuple[str, str] = ("", ""), gap: int = 8
) -> Image.Image:
    """Two images next to each other on a white sheet, each under its title."""
    font = _font(max(400, min(left.height, right.height)))
    title_h = font.getbbox("Ag")[3] + 8 if any(titles) else 0
    sheet = Image.new("RGB", (left.width + gap + right.width, title_h + max(left.height, right.height)), "white")
    draw = ImageDraw.Draw(sheet)
    for x, picture, title in ((0, left, titles[0]), (left.width + gap, right, titles[1])):
        sheet.paste(picture, (x, title_h))
        if title:
            draw.text((x + 2, 3), title, fill=(0, 0, 0), font=font)
    return sheet


def decode_results(results: Sequence[dict], height: int, width: int) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """COCO results (or annotations) of one image -> ``masks [N, H, W]`` bool, ``boxes [N, 4]``
    xyxy, ``scores [N]`` (1 for annotations) and the N category ids; one RLE decode call.
    Polygons and uncompressed RLEs are converted as pycocotools does, within
    :mod:`mfcache.data.segmentation`'s memory bounds."""
    if not results:
        return (torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0, 4), torch.zeros(0), [])
    rles = [segmentation_rle(r["segmentation"], height, width) for r in results]
    masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).bool()
    xywh = torch.tensor([r["bbox"] for r in results], dtype=torch.float32)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    scores = torch.tensor([float(r.get("score", 1.0)) for r in results])
    return masks, boxes, scores, [int(r["category_id"]) for r in results]


_PANEL = re.compile(r"^\d+(\.tmp)?\.png$")  # <image_id>.png, and a temporary one a kill left behind


def stale_panels(folder: Path) -> list[Path]:
    """The panel files (``<image_id>.png``) in ``folder``: regular files named as
    :func:`visualize_split` names them, nothing else (no links, no other names)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _PANEL.match(p.name) and p.is_file() and not p.is_symlink())


def visualize_split(
    split,
    results: Sequence[dict],
    out_dir: Path,
    n: int,
    *,
    score_threshold: float = 0.3,
    images_dir: Path | None = None,
) -> list[Path]:
    """Ground truth | prediction panels for the first ``n`` complete images of a cache split
    (:class:`mfcache.cache.reader.CacheSplit`), written to ``out_dir/<image_id>.png``;
    returns the paths. A panel that would land outside ``out_dir``'s parent (``out_dir`` or
    a panel being a link that leads elsewhere) is refused before any is drawn. The panels a
    previous call left in ``out_dir`` (:func:`stale_panels`) are removed first, so the folder
    shows these results only.

    GT masks come from the split's cached annotations; predictions are ``results`` (COCO
    results of the split) scoring at least ``score_threshold``. Pixels are read from
    ``images_dir`` (default: the folder recorded at extraction).
    """
    recorded = images_dir is None
    images_dir = Path(split.attrs["images_dir"] if recorded else images_dir)
    if not images_dir.is_dir():
        where = (
            "recorded at extraction; name its new place with `visualize.images_dir`"
            if recorded
            else "given with `visualize.images_dir`"
        )
        raise MfcacheError(f"cannot draw split {split.name!r}: its image folder {images_dir} ({where}) is gone")
    coco = split.coco()
    names = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    predicted = dict([AGNOSTIC_CATEGORY]) if split.class_agnostic else names  # what the results' ids name
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= score_threshold:
            by_image.setdefault(int(r["image_id"]), []).append(r)
    image_ids = [int(split.index["image_id"][i]) for i in split.complete_rows[:n]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # out_dir is a folder of its parent (the metrics folder): a link there must not lead elsewhere
    targets = {
        image_id: inside(out_dir.parent, Path(out_dir.name) / f"{image_id}.png", what="panel") for image_id in image_ids
    }
    for old in stale_panels(out_dir):
        old.unlink()
    written = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        image = load_image(images_dir / info["file_name"])
        height, width = image.shape[1:]
        gt = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        panels = []
        for items, kind in ((gt, "ground truth"), (by_image.get(image_id, []), "prediction")):
            masks, boxes, scores, categories = decode_results(items, height, width)
            labels = [(predicted if kind == "prediction" else names).get(c, str(c)) for c in categories]
            panels.append(overlay(image, masks, boxes, labels, scores if kind == "prediction" else None))
        titles = (
            f"ground truth ({len(gt)})",
            f"prediction ({len(by_image.get(image_id, []))}, score >= {score_threshold:g})",
        )
        path = targets[image_id]
        tmp = path.with_suffix(".tmp.png")
        side_by_side(*panels, titles=titles).save(tmp)
        shutil.move(tmp, path)
        written.append(path)
    return written
