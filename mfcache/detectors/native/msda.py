"""Deformable DETR's ``MSDeformAttn`` module with the original parameter names."""

from __future__ import annotations

from torch import Tensor, nn

from mfcache.deformable_attention import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Deformable DETR's ``MSDeformAttn`` module (same parameter names, so checkpoints load).

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

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, spatial_shapes: Tensor,
                padding_mask: Tensor | None = None) -> Tensor:
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
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))
