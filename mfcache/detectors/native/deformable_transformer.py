"""Encoder and decoder stacks of the Deformable DETR lineage (inference path only).

Names follow the original repos so checkpoints load unchanged:
``encoder.layers.N.{self_attn, norm1, linear1, linear2, norm2}``,
``decoder.layers.N.{cross_attn, norm1, self_attn, norm2, linear1, linear2, norm3}``
(post-norm: self-attention -> norm2, cross-attention -> norm1, FFN -> norm3), and for
DINO ``decoder.{ref_point_head, norm}``.

Shapes: batch first everywhere; ``S = sum(h*w)`` memory tokens, ``L`` levels, ``Q`` queries.
Reference points are normalised to each image's *real* (unpadded) extent and multiplied by
``valid_ratios [B, L, 2]`` (w, h fractions) before sampling the padded maps, as the originals.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfcache.detectors.native.position import box_sine_embedding
from mfcache.ops.deformable_attention import MSDeformAttn


def inverse_sigmoid(x: Tensor, eps: float) -> Tensor:
    """log(x / (1 - x)) with both clamped to >= ``eps``: the families differ in ``eps``
    (Deformable DETR / H-DETR 1e-5, DINO 1e-3), which matters for coordinates near 0 or 1."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``layers.{0..n-1}`` linears with ReLU between (DETR's box head / DINO's ref_point_head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


# ----------------------------------------------------------------------------- levels
def valid_ratios(level_masks: list[Tensor]) -> Tensor:
    """[B, L, 2] (w, h) fraction of each padded level covered by the image (masks True = pad)."""
    out = []
    for m in level_masks:
        h, w = m.shape[1:]
        out.append(torch.stack([(~m[:, 0, :]).sum(1).float() / w, (~m[:, :, 0]).sum(1).float() / h], -1))
    return torch.stack(out, 1)


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor) -> Tensor:
    """[B, S, L, 2]: every token's pixel centre, normalised to the real extent, then scaled
    into each level by its valid ratio (Deformable DETR ``get_reference_points``)."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, device=ratios.device),
            torch.linspace(0.5, w - 0.5, w, device=ratios.device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


def encoder_proposals(memory: Tensor, pad_mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """Two-stage proposals (``gen_encoder_output_proposals``), one per memory token.

    memory [B, S, D], pad_mask [B, S] True = padding -> (memory with padded and
    border tokens zeroed [B, S, D], unsigmoided proposals [B, S, 4] (cx, cy, w, h), +inf where
    invalid). A proposal is the token centre with side 0.05 * 2**level, relative to the real extent.
    """
    b = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        m = pad_mask[:, start : start + h * w].view(b, h, w)
        valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_w, valid_h], 1).view(b, 1, 1, 2)
        grid = (grid[None].expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    keep = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(pad_mask[..., None], float("inf")).masked_fill(~keep, float("inf"))
    memory = memory.masked_fill(pad_mask[..., None], 0.0).masked_fill(~keep, 0.0)
    return memory, proposals


# ----------------------------------------------------------------------------- layers
class EncoderLayer(nn.Module):
    """Deformable self-attention over all tokens + FFN, post-norm."""

    def __init__(self, *, d_model: int, dim_feedforward: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor, pad_mask: Tensor
    ) -> Tensor:
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, pad_mask))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    """Query self-attention -> norm2, deformable cross-attention -> norm1, FFN -> norm3."""

    def __init__(self, *, d_model: int, dim_feedforward: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        pad_mask: Tensor,
    ) -> Tensor:
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, pad_mask))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


# ----------------------------------------------------------------------------- stacks
class Encoder(nn.Module):
    """forward(src [B, S, D], pos [B, S, D] (with level embedding), spatial_shapes [L, 2],
    valid_ratios [B, L, 2], pad_mask [B, S]) -> memory [B, S, D]."""

    def __init__(self, layer: EncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, ratios: Tensor, pad_mask: Tensor) -> Tensor:
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, pad_mask)
        return src


def _level_references(reference_points: Tensor, ratios: Tensor) -> Tensor:
    """[B, Q, 2|4] references -> [B, Q, L, 2|4] scaled into each level."""
    if reference_points.shape[-1] == 4:
        return reference_points[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]
    return reference_points[:, :, None] * ratios[:, None]


def refine_boxes(bbox_embed: nn.Module, output: Tensor, reference_points: Tensor, eps: float) -> Tensor:
    """Iterative box refinement: sigmoid(bbox_embed(output) + inverse_sigmoid(reference, eps))."""
    delta = bbox_embed(output)
    unsigmoid = inverse_sigmoid(reference_points, eps)
    if reference_points.shape[-1] == 4:
        return (delta + unsigmoid).sigmoid()
    return torch.cat([delta[..., :2] + unsigmoid, delta[..., 2:]], -1).sigmoid()


class Decoder(nn.Module):
    """Deformable DETR / H-DETR decoder. ``bbox_embed`` (a ModuleList, set by the model as
    the originals do) enables iterative refinement; without it references stay fixed.

    forward(tgt [B, Q, D], query_pos [B, Q, D], reference_points [B, Q, 2|4] in [0, 1], memory,
    spatial_shapes, valid_ratios, pad_mask) -> (output of the last layer [B, Q, D],
    the references that layer used [B, Q, 2|4]).
    """

    refine_eps = 1e-5  # the family's inverse_sigmoid epsilon (Deformable DETR's util/misc.py)

    def __init__(self, layer: DecoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        ratios: Tensor,
        pad_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        output = tgt
        for lid, layer in enumerate(self.layers):
            used = reference_points
            output = layer(
                output, query_pos, _level_references(reference_points, ratios), memory, spatial_shapes, pad_mask
            )
            if self.bbox_embed is not None:
                reference_points = refine_boxes(self.bbox_embed[lid], output, reference_points, self.refine_eps)
        return output, used


def encoder_for(cfg) -> Encoder:
    """``transformer.encoder`` as a native config (d_model, dim_feedforward, nheads,
    num_feature_levels, enc_n_points, enc_layers) describes it."""
    return Encoder(
        EncoderLayer(
            d_model=cfg.d_model,
            dim_feedforward=cfg.dim_feedforward,
            n_levels=cfg.num_feature_levels,
            n_heads=cfg.nheads,
            n_points=cfg.enc_n_points,
        ),
        cfg.enc_layers,
    )


def decoder_layer_for(cfg) -> DecoderLayer:
    """One ``transformer.decoder`` layer as a native config describes it."""
    return DecoderLayer(
        d_model=cfg.d_model,
        dim_feedforward=cfg.dim_feedforward,
        n_levels=cfg.num_feature_levels,
        n_heads=cfg.nheads,
        n_points=cfg.dec_n_points,
    )


class DinoDecoder(Decoder):
    """DINO's decoder: each layer's positional query is ``ref_point_head`` applied to the
    sine embedding of its 4-d reference box (scaled by the first level's valid ratio);
    ``norm`` is applied to every layer's output that the heads see, while refinement
    uses the un-normalised output, as in DINO.

    Returns (norm(output of the last layer) [B, Q, D], the references it used [B, Q, 4]).
    """

    refine_eps = 1e-3  # DINO's util/misc.py inverse_sigmoid(x, eps=1e-3), in the decoder and the final boxes

    def __init__(self, layer: DecoderLayer, num_layers: int, *, d_model: int):
        super().__init__(layer, num_layers)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor | None,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        ratios: Tensor,
        pad_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        output = tgt
        for lid, layer in enumerate(self.layers):
            used = reference_points
            level_refs = _level_references(reference_points, ratios)
            query_pos = self.ref_point_head(box_sine_embedding(level_refs[:, :, 0, :], self.d_model // 2))
            output = layer(output, query_pos, level_refs, memory, spatial_shapes, pad_mask)
            if self.bbox_embed is not None:
                reference_points = refine_boxes(self.bbox_embed[lid], output, reference_points, self.refine_eps)
        return self.norm(output), used
