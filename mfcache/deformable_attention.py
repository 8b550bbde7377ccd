"""Multi-scale deformable attention sampling (Deformable DETR), pure PyTorch: shared by the
native detectors and the mask heads' deformable encoder.

Conventions (as the original CUDA op and ``ms_deform_attn_core_pytorch``):
- levels are flattened finest first, each row-major (h, w);
- sampling locations are (x, y) in [0, 1] relative to each level's *padded* map, the
  centre of pixel (r, c) at ((c + 0.5) / w, (r + 0.5) / h); bilinear sampling with zero
  padding outside the map (``grid_sample(align_corners=False, padding_mode="zeros")``).

All levels are sampled by **one** ``grid_sample`` call: the levels of each (image, head)
are laid side by side on one zero canvas with a zero column between neighbours, and a
sample that falls outside its own level (where it could only read zeros) is moved off
the canvas. Every in-level bilinear tap therefore reads its own level or a zero, which
makes the result identical to per-level sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _canvas_layout(shapes: list[tuple[int, int]], device: torch.device) -> tuple[int, int, Tensor, Tensor]:
    """Canvas (height, width), per-level column offsets [L], and the flat canvas position
    of every token [sum(h*w)] (levels side by side, one zero column after each)."""
    height = max(h for h, _ in shapes)
    starts = [0]
    for _, w in shapes[:-1]:
        starts.append(starts[-1] + w + 1)
    width = starts[-1] + shapes[-1][1] + 1
    flat = [(torch.arange(h, device=device)[:, None] * width + x0 + torch.arange(w, device=device)).flatten()
            for (h, w), x0 in zip(shapes, starts)]
    return height, width, torch.tensor(starts, device=device), torch.cat(flat)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Deformable attention over all levels in one sampling call.

    value:              [N, S, M, Dh]  S = sum(h*w) tokens, M heads, Dh channels per head
    spatial_shapes:     [L, 2]         (h, w) of each level
    sampling_locations: [N, Q, M, L, P, 2]  (x, y) in [0, 1] per level
    attention_weights:  [N, Q, M, L, P]     (already softmax-normalised over L*P)
    returns             [N, Q, M*Dh]   heads concatenated head-major
    """
    n, _, m, dh = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    height, width, offsets, token_pos = _canvas_layout(shapes, value.device)

    canvas = value.new_zeros(n, m, dh, height * width)
    canvas[..., token_pos] = value.permute(0, 2, 3, 1)
    canvas = canvas.view(n * m, dh, height, width)

    sizes = spatial_shapes.to(sampling_locations.dtype)  # [L, 2] (h, w)
    level_w, level_h = sizes[:, 1].view(1, 1, 1, -1, 1), sizes[:, 0].view(1, 1, 1, -1, 1)
    px = sampling_locations[..., 0] * level_w  # pixel units + 0.5
    py = sampling_locations[..., 1] * level_h
    # a bilinear tap at pixel coordinate c = px - 0.5 touches the level only for -1 < c < w
    inside = (px > -0.5) & (px < level_w + 0.5) & (py > -0.5) & (py < level_h + 0.5)
    gx = 2 * (px + offsets.to(px.dtype).view(1, 1, 1, -1, 1)) / width - 1
    gy = 2 * py / height - 1
    grid = torch.stack([gx, gy], dim=-1).masked_fill(~inside[..., None], -2.0)  # -2: off the canvas
    grid = grid.permute(0, 2, 1, 3, 4, 5).reshape(n * m, q, num_levels * p, 2)

    sampled = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(n * m, 1, q, num_levels * p)
    out = (sampled * weights).sum(-1)  # [N*M, Dh, Q]
    return out.view(n, m * dh, q).transpose(1, 2)
