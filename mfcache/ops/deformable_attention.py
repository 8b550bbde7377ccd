"""Multi-scale deformable attention (Deformable DETR), pure PyTorch: the sampling op and the
``MSDeformAttn`` module, shared by the native detectors and the mask heads' deformable encoder.

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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _canvas_layout(shapes: list[tuple[int, int]], device: torch.device) -> tuple[int, int, Tensor, Tensor]:
    """Canvas (height, width), per-level column offsets [L], and the flat canvas position
    of every token [sum(h*w)] (levels side by side, one zero column after each)."""
    height = max(h for h, _ in shapes)
    starts = [0]
    for _, w in shapes[:-1]:
        starts.append(starts[-1] + w + 1)
    width = starts[-1] + shapes[-1][1] + 1
    flat = [
        (torch.arange(h, device=device)[:, None] * width + x0 + torch.arange(w, device=device)).flatten()
        for (h, w), x0 in zip(shapes, starts)
    ]
    return height, width, torch.tensor(starts, device=device), torch.cat(flat)


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
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


class MSDeformAttn(nn.Module):
    """Deformable DETR's ``MSDeformAttn`` module: the original parameter names (so the native
    detectors load published checkpoints) and the original initialisation (for mask heads
    trained from scratch: head h starts sampling on a ray at angle 2*pi*h/heads, point p at
    distance p + 1, with uniform attention).

    forward(query [B, Q, D], reference_points [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h),
    input_flatten [B, S, D], spatial_shapes [L, 2], padding_mask [B, S] True = padding)
    -> [B, Q, D]. Offsets are in level pixels for 2-d references and in units of
    half the box size / n_points for 4-d references, as the original.
    """

    def __init__(self, *, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(n_heads) * (2 * math.pi / n_heads)
        ray = torch.stack([angle.cos(), angle.sin()], -1)
        ray = ray / ray.abs().max(-1, keepdim=True).values
        bias = ray[:, None, None, :] * torch.arange(1, n_points + 1)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(n_heads, n_levels, n_points, 2).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        b, q, _ = query.shape
        s = input_flatten.shape[1]
        m, num_levels, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, m, -1)
        offsets = self.sampling_offsets(query).view(b, q, m, num_levels, p, 2)
        weights = self.attention_weights(query).view(b, q, m, num_levels * p).softmax(-1)
        weights = weights.view(b, q, m, num_levels, p)
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (w, h)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))
