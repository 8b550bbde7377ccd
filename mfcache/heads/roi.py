"""RoIAlign of one map per image, by one of two paths chosen by the map's size.

- ``dense``: two matrix products: bilinear sampling is separable, so the M x M bins of a box
  are ``Wy @ F @ Wx^T`` with ``Wy [M, H]`` and ``Wx [M, W]`` interpolation weights. Its
  backward is a pair of matmuls instead of a scatter, which made the baseline head's training
  step ~10x faster on the CPU on small maps; but its work and its ``[n, C, M, W]``
  intermediate grow with the map's area (at the paper's 800x1333 input, 100 boxes: ~100 GFLOP
  and ~1 GB), where torchvision's cost depends on the boxes alone.
- ``torchvision``: ``torchvision.ops.roi_align(aligned=True)`` on the image's map alone.

``auto`` (the default) takes the dense path for maps of at most :data:`DENSE_MAX_PIXELS`
pixels, torchvision's above (``benchmarks/roi_align_speed.py`` measured the crossover). Both
give torchvision's values (float rounding apart).

Given one map per image at its own size (the heads' fused maps), a RoI samples only its own
image's extent (border clamping included), exactly as ``torchvision.ops.roi_align`` on that
image alone would, whatever the other images of the batch: every path runs image by image on
that image's own map, and the path is chosen from that map's size alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor


def axis_weights(lo: Tensor, hi: Tensor, bins: int, samples: int, size: int) -> Tensor:
    """Interpolation weights ``[N, bins, size]`` along one axis for boxes spanning
    ``[lo, hi]`` (continuous coords, pixel centres at integers): each bin averages
    ``samples`` evenly spaced bilinear samples, with torchvision's border rules."""
    steps = (torch.arange(bins * samples, device=lo.device, dtype=lo.dtype) + 0.5) / (bins * samples)
    coords = lo[:, None] + steps * (hi - lo)[:, None]  # [N, P]
    inside = ((coords >= -1) & (coords <= size)).to(lo.dtype)
    c = coords.clamp(0, size - 1)
    low = c.floor()
    frac = c - low
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    weights = torch.zeros(*coords.shape, size, device=lo.device, dtype=lo.dtype)
    weights.scatter_add_(2, low[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights.view(-1, bins, samples, size).mean(2)


def per_image(batch_index: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``batch_index [N]`` -> (image b, positions ``[n_b]`` of its rows), for each image present."""
    for b in torch.unique(batch_index).tolist():
        yield b, torch.nonzero(batch_index == b).flatten()


def rows_per_image(batch_index: Tensor, rows: Callable[[int, Tensor], Tensor], empty: Tensor) -> Tensor:
    """``[N, ...]``: the rows of each image ``b`` computed together, ``rows(b, positions)``,
    in the dtype they come in (a mixed-precision forward keeps its own); ``empty`` when N = 0."""
    out = None
    for b, sel in per_image(batch_index):
        part = rows(b, sel)
        if out is None:
            out = part.new_empty(len(batch_index), *part.shape[1:])
        out[sel] = part
    return empty if out is None else out


# The dense path up to this many map pixels (a 96 x 96 map at stride 4: a 384 x 384 input), torchvision's above.
# benchmarks/roi_align_speed.py (results in benchmarks/results/roi_align_speed/), 2 CPU threads, 20 boxes' forward +
# backward (training): the dense path is faster on a 64 x 86 map (0.6-0.85x of torchvision's time over three
# runs), torchvision's from about 96 x 128 (0.6-1.6x there: the crossover), 1.8-2.5x at the paper's 200 x 267;
# 100 boxes' forward (inference) favours torchvision's on every map measured (1.7-2.1x at 64 x 86, 2.2-4.5x at
# 200 x 267). The bound also caps the dense path's [n, C, M, W] intermediate.
DENSE_MAX_PIXELS = 96 * 96
ROI_METHODS = ("auto", "dense", "torchvision")


def roi_method(height: int, width: int, method: str = "auto") -> str:
    """The path (``dense`` or ``torchvision``) RoIAlign takes on an ``height x width`` map."""
    if method not in ROI_METHODS:
        raise ValueError(f"method must be one of {ROI_METHODS}, got {method!r}")
    if method == "auto":
        return "dense" if height * width <= DENSE_MAX_PIXELS else "torchvision"
    return method


def roi_align_image(
    features: Tensor, boxes: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int, method: str = "auto"
) -> Tensor:
    """RoIAlign of one image: ``features [C, h, w]``, ``boxes [n, 4]`` xyxy input px ->
    ``[n, C, M, M]`` (aligned=True, bins sampled and clamped against ``h x w``), by the path
    :func:`roi_method` chooses for this map."""
    if roi_method(*features.shape[-2:], method) == "torchvision":
        from torchvision.ops import roi_align as tv_roi_align

        # float32 at least (coordinates too): torchvision's kernel takes one dtype for both
        dtype = torch.promote_types(features.dtype, torch.float32)
        out = tv_roi_align(
            features[None].to(dtype), [boxes.to(dtype)], output_size, spatial_scale, sampling_ratio, aligned=True
        )
        return out.to(features.dtype)
    # coordinates in float32 at least, even under autocast (a bf16 coordinate of 300 px is off by up to 1 px)
    b = boxes.to(torch.promote_types(features.dtype, torch.float32)) * spatial_scale - 0.5
    wy = axis_weights(b[:, 1], b[:, 3], output_size, sampling_ratio, features.shape[-2])  # [n, M, h]
    wx = axis_weights(b[:, 0], b[:, 2], output_size, sampling_ratio, features.shape[-1])  # [n, M, w]
    rows = torch.einsum("nmh,chw->ncmw", wy, features)
    return torch.einsum("ncmw,nkw->ncmk", rows, wx)


def roi_align(
    features: Tensor | Sequence[Tensor],
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int = 2,
    method: str = "auto",
) -> Tensor:
    """features [B, C, H, W], or B maps [C, h_b, w_b] each at its image's own size; rois [N, 5]
    (batch index, x1, y1, x2, y2 in input pixels) -> [N, C, output_size, output_size], as
    ``torchvision.ops.roi_align(..., aligned=True)`` on each RoI's image alone (``method``:
    see :func:`roi_method`)."""
    m = output_size
    return rows_per_image(  # one call per image, not per box
        rois[:, 0].long(),
        lambda b, sel: roi_align_image(features[b], rois[sel, 1:], m, spatial_scale, sampling_ratio, method),
        features[0].new_empty(0, features[0].shape[0], m, m),
    )
