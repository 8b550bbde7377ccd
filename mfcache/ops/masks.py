"""Mask geometry: pasting box-level masks into images, cropping GT masks into boxes,
RLE encoding and bit-packing.

Coordinate convention (shared with detectron2 and torchvision's ``roi_align(aligned=True)``):
boxes are ``xyxy`` in continuous pixel coordinates, where pixel ``i`` covers ``[i, i + 1)``
and its centre is ``i + 0.5``. A box-level mask ``[M, M]`` spans the box exactly, so its
cell ``j`` covers ``[x0 + j * w / M, x0 + (j + 1) * w / M)``.
"""

from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = [
    "crop_mask_targets",
    "encode_rle",
    "mask_iou",
    "pack_masks",
    "paste_masks",
    "paste_masks_reference",
    "unpack_masks",
]

# Smallest box side used when normalising sample positions; keeps degenerate boxes
# (x1 <= x0) finite so they simply paste nothing.
_MIN_SIDE = 1e-6


def _as_nmm(masks: Tensor) -> Tensor:
    """[N, M, M] or [N, 1, M, M] -> [N, Mh, Mw]."""
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be [N, M, M] or [N, 1, M, M], got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, M, M] or [N, 1, M, M], got {tuple(masks.shape)}")
    return masks


def _check_boxes(boxes: Tensor, n: int) -> None:
    if boxes.dim() != 2 or boxes.shape != (n, 4):
        raise ValueError(f"boxes must be [{n}, 4] xyxy, got {tuple(boxes.shape)}")


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_hw: tuple[int, int],
    *,
    threshold: float | None = 0.5,
    chunk_pixels: int = 2**26,
) -> Tensor:
    """Paste box-level masks into full images.

    masks:     [N, M, M] (or [N, 1, M, M]) probabilities over each box's interior; non-square
               [N, Mh, Mw] also works. Any dtype; sampled in float32 (float64 stays float64).
    boxes:     [N, 4] xyxy, absolute image pixels, float; may extend past the image.
    image_hw:  (H, W) of the output.
    threshold: if given, returns [N, H, W] bool of ``prob >= threshold``; if None, returns the
               [N, H, W] float probabilities.
    chunk_pixels: at most this many output pixels are sampled at once (the sampling grid adds
               two floats per pixel, so peak scratch memory is about 12 * chunk_pixels bytes in
               float32). Chunks are groups of whole masks, or bands of image rows when a single
               mask is larger than the budget (never less than one row). On CPU every
               chunk is a single mask, sampled only around its box.

    Each output pixel's centre is mapped into its box's mask and sampled bilinearly with
    ``F.grid_sample(align_corners=False, padding_mode="zeros")``, exactly as detectron2's
    ``_do_paste_mask``: across each box edge the mask fades to zero over half a mask cell
    either side (edge value 0.5 * m), so with a fully-on mask a pixel is on iff its centre is
    inside the box, except near corners, where the two fades multiply and a few pixels whose
    centres lie within half a cell of both edges drop out. Within a chunk only the
    window covered by the chunk's boxes (plus that half cell) is sampled; the output is the
    same for every ``chunk_pixels``. Runs on ``masks.device``.
    """
    masks = _as_nmm(masks)
    height, width = int(image_hw[0]), int(image_hw[1])
    if chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be positive, got {chunk_pixels}")
    if height * width <= chunk_pixels:
        per_chunk, band = chunk_pixels // max(1, height * width), height
        if masks.device.type == "cpu":
            # On CPU, one mask per chunk: its window is just its box, so the work is the sum
            # of box areas rather than masks x the union window (detectron2 does the same).
            per_chunk = 1
    else:
        per_chunk, band = 1, max(1, chunk_pixels // max(1, width))
    return _paste(masks, boxes, (height, width), threshold, per_chunk, band)


def _paste(
    masks: Tensor,
    boxes: Tensor,
    image_hw: tuple[int, int],
    threshold: float | None,
    per_chunk: int,
    band: int,
) -> Tensor:
    """``paste_masks`` with the chunk layout given: masks [N, Mh, Mw], boxes [N, 4] xyxy;
    ``per_chunk`` masks at a time, each chunk in bands of ``band`` image rows."""
    n, mh, mw = masks.shape
    _check_boxes(boxes, n)
    height, width = image_hw
    device = masks.device
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    out_dtype = torch.bool if threshold is not None else dtype
    # Column-major pixels ([N, W, H] in memory, returned as an [N, H, W] view): the layout
    # COCO's RLE encoder reads, so encode_rle needs no transpose copy of whole images.
    out = torch.zeros((n, width, height), dtype=out_dtype, device=device).transpose(1, 2)
    if n == 0 or height == 0 or width == 0 or mh == 0 or mw == 0:
        return out

    masks = masks.to(dtype)[:, None]  # [N, 1, Mh, Mw]: grid_sample wants a channel axis
    boxes = boxes.to(device=device, dtype=dtype)
    x0, y0, x1, y1 = boxes.unbind(1)
    bw = (x1 - x0).clamp(min=_MIN_SIDE)
    bh = (y1 - y0).clamp(min=_MIN_SIDE)
    # Zero padding lets a mask bleed half a cell beyond its box (values < 0.5 * edge value);
    # the sampling window includes that margin (+1 px for rounding) so that the probabilities
    # do not depend on how the work was chunked.
    lo_x = x0 - bw / (2 * mw) - 1
    hi_x = x1 + bw / (2 * mw) + 1
    lo_y = y0 - bh / (2 * mh) - 1
    hi_y = y1 + bh / (2 * mh) + 1

    for start in range(0, n, per_chunk):
        sl = slice(start, min(start + per_chunk, n))
        # One host sync per chunk to get the chunk's pixel window.
        wx0, wx1, wy0, wy1 = torch.stack([lo_x[sl].min(), hi_x[sl].max(), lo_y[sl].min(), hi_y[sl].max()]).tolist()
        wx0, wx1 = max(0, math.floor(wx0)), min(width, math.ceil(wx1))
        wy0, wy1 = max(0, math.floor(wy0)), min(height, math.ceil(wy1))
        if wx0 >= wx1 or wy0 >= wy1:
            continue  # every box of the chunk lies outside the image
        for r0 in range(wy0, wy1, band):
            r1 = min(r0 + band, wy1)
            out[sl, r0:r1, wx0:wx1] = _sample(
                masks[sl], x0[sl], y0[sl], bw[sl], bh[sl], (r0, r1), (wx0, wx1), threshold
            )
    return out


def _sample(
    masks: Tensor,
    x0: Tensor,
    y0: Tensor,
    bw: Tensor,
    bh: Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    threshold: float | None,
) -> Tensor:
    """masks [n, 1, Mh, Mw]; x0, y0, bw, bh [n] -> [n, h, w] samples at the centres of
    image pixels rows x cols (half-open ranges), bool if threshold is given."""
    n = masks.shape[0]
    dev, dt = masks.device, masks.dtype
    centres_y = torch.arange(rows[0], rows[1], device=dev, dtype=dt) + 0.5
    centres_x = torch.arange(cols[0], cols[1], device=dev, dtype=dt) + 0.5
    # Box-normalised coordinates: -1 / +1 are the box's edges (align_corners=False).
    # Clamping to +-2 changes nothing (anything beyond 1 + 1/M samples only padding) but
    # keeps huge values from near-degenerate boxes out of grid_sample's index arithmetic.
    gy = ((centres_y[None] - y0[:, None]) / bh[:, None] * 2 - 1).clamp(-2, 2)  # [n, h]
    gx = ((centres_x[None] - x0[:, None]) / bw[:, None] * 2 - 1).clamp(-2, 2)  # [n, w]
    h, w = gy.shape[1], gx.shape[1]
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=3)
    probs = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    probs = probs[:, 0]
    return probs >= threshold if threshold is not None else probs


def paste_masks_reference(
    masks: Tensor, boxes: Tensor, image_hw: tuple[int, int], threshold: float | None = 0.5
) -> Tensor:
    """Slow per-mask reference for ``paste_masks``: same inputs and outputs.

    For each mask, the box is snapped to whole pixels (``x0i = floor(x0 + 0.5)`` is the first
    pixel whose centre is inside the box, likewise ``x1i`` is one past the last; at least one
    pixel), the mask is resized to that extent with ``F.interpolate(bilinear,
    align_corners=False)`` and copied into place, clipped to the image.

    Where it differs from ``paste_masks`` (by about a pixel, at box edges):
    - snapping moves each box edge by up to half a pixel, which stretches the whole mask by
      up to half a pixel at each side (so boundaries inside small boxes can move too);
    - ``F.interpolate`` replicates edge cells while ``grid_sample`` blends them with zero
      padding, so a mask that is on but below 1.0 at its box edge loses a sliver (< half a
      mask cell) along that edge in ``paste_masks`` and not here, and the reference is hard
      zero outside the box where ``paste_masks`` has a soft (< 0.5) margin;
    - boxes narrower than a pixel still paste one pixel here, possibly none in ``paste_masks``.
    Allocates a box-sized buffer per mask, so keep boxes reasonable.
    """
    masks = _as_nmm(masks)
    n = masks.shape[0]
    _check_boxes(boxes, n)
    height, width = int(image_hw[0]), int(image_hw[1])
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    out = torch.zeros((n, height, width), dtype=dtype, device=masks.device)
    for i, (bx0, by0, bx1, by1) in enumerate(boxes.tolist()):
        x0i, y0i = math.floor(bx0 + 0.5), math.floor(by0 + 0.5)
        x1i, y1i = max(math.floor(bx1 + 0.5), x0i + 1), max(math.floor(by1 + 0.5), y0i + 1)
        cx0, cx1 = max(x0i, 0), min(x1i, width)
        cy0, cy1 = max(y0i, 0), min(y1i, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        resized = F.interpolate(
            masks[i][None, None].to(dtype),
            size=(y1i - y0i, x1i - x0i),
            mode="bilinear",
            align_corners=False,
        )[0, 0]
        out[i, cy0:cy1, cx0:cx1] = resized[cy0 - y0i : cy1 - y0i, cx0 - x0i : cx1 - x0i]
    return out >= threshold if threshold is not None else out


def encode_rle(masks: Tensor) -> list[dict]:
    """[N, H, W] bool -> N COCO compressed RLEs ``{"size": [H, W], "counts": str}``.

    One ``pycocotools.mask.encode`` call on a Fortran-ordered [H, W, N] uint8 array (the
    layout COCO's column-major RLE needs); counts are decoded to str so the dicts are
    JSON-ready.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    # [N, H, W] -> [N, W, H] contiguous, viewed as [H, W, N]: Fortran order. Masks from
    # paste_masks are already laid out so: no copy then (bool is reinterpreted as uint8).
    cols = masks.detach().cpu().transpose(1, 2).contiguous()
    cols = cols.view(torch.uint8) if cols.dtype == torch.bool else cols.to(torch.uint8)
    rles = mask_utils.encode(np.asfortranarray(cols.numpy().transpose(2, 1, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def crop_mask_targets(gt_masks: Tensor, boxes: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """Mask-head targets: each box's matched GT mask resampled inside the box.

    gt_masks: [G, H, W] bool, the image's GT instance masks.
    boxes:    [N, 4] xyxy, image pixels (the predicted boxes).
    gt_index: [N] long, the GT matched to each box; -1 = unmatched.
    returns   [N, size, size] bool: ``roi_align(aligned=True, sampling_ratio=2)`` of the
              float GT mask over the box, then ``>= 0.5``; all-False rows where gt_index is -1.

    One roi_align call over the matched boxes, using gt_index as the roi's batch index so
    the [G, H, W] masks are never gathered per box. Runs on ``gt_masks.device``.
    """
    n = boxes.shape[0]
    _check_boxes(boxes, n)
    device = gt_masks.device
    out = torch.zeros((n, size, size), dtype=torch.bool, device=device)
    gt_index = gt_index.to(device=device, dtype=torch.long)
    matched = gt_index >= 0
    if not bool(matched.any()):
        return out
    if int(gt_index.max()) >= gt_masks.shape[0]:
        raise ValueError(f"gt_index refers to GT {int(gt_index.max())} of {gt_masks.shape[0]}")
    rois = torch.cat(
        [gt_index[matched, None].float(), boxes.to(device=device, dtype=torch.float32)[matched]],
        dim=1,
    )  # [n_matched, 5]: (batch index, x0, y0, x1, y1)
    crops = roi_align(
        gt_masks[:, None].float(),
        rois,
        output_size=size,
        spatial_scale=1.0,
        sampling_ratio=2,
        aligned=True,
    )  # [n_matched, 1, size, size]
    out[matched] = crops[:, 0] >= 0.5
    return out


def pack_masks(masks: Tensor) -> np.ndarray:
    """[..., M, M] bool -> [..., ceil(M*M / 8)] uint8: the flattened mask bit-packed
    (``np.packbits``, big-endian bit order, zero-padded to whole bytes)."""
    arr = masks.detach().to("cpu", torch.bool).numpy()
    flat = arr.reshape(*arr.shape[:-2], arr.shape[-2] * arr.shape[-1])
    return np.packbits(flat, axis=-1)


def unpack_masks(packed: np.ndarray | Tensor, size: int) -> Tensor:
    """Inverse of ``pack_masks``: [..., ceil(size*size / 8)] uint8 -> [..., size, size] bool
    (a CPU tensor)."""
    if isinstance(packed, Tensor):
        packed = packed.detach().cpu().numpy()
    packed = np.asarray(packed, dtype=np.uint8)
    n_bytes = -(-size * size // 8)
    if packed.shape[-1] != n_bytes:
        raise ValueError(f"packed masks of size {size} need {n_bytes} bytes, got last dim {packed.shape[-1]}")
    bits = np.unpackbits(packed, axis=-1, count=size * size)
    return torch.from_numpy(bits.reshape(*packed.shape[:-1], size, size)).bool()


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """a, b [N, H, W] bool -> [N] float32 IoU of each pair; 1.0 where both are empty
    (identical masks score 1)."""
    a = a.flatten(1)
    b = b.flatten(1)
    inter = (a & b).sum(1, dtype=torch.float32)
    union = (a | b).sum(1, dtype=torch.float32)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
