"""H-DETR (hybrid matching Deformable DETR), inference path.

At inference H-DETR uses only its one-to-one branch: the first ``num_queries``
(``num_queries_one2one``) queries. The one-to-many queries are blocked from them by the
self-attention mask during training and carry no information at test time, and
``torch.topk`` returns proposals sorted, so running only the first ``num_queries`` gives
the one-to-one outputs of the full model.

Variants (the options of the original ``main.py``): plain / ``with_box_refine`` /
``two_stage`` (requires box refinement), and ``mixed_selection`` (two-stage boxes give the
positional queries, ``query_embed`` the content queries). ``look_forward_twice`` changes
training only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mfcache.detectors.native.deformable_transformer import Decoder, decoder_layer_for, encoder_for, encoder_proposals
from mfcache.detectors.native.detector import NativeConfig, NativeDetector
from mfcache.detectors.native.position import proposal_position_embedding


@dataclass(frozen=True)
class HDetrConfig(NativeConfig):
    """Defaults: the released H-DETR R50 two-stage + box refine + mixed selection model
    (``dim_feedforward 2048``, 300 one-to-one and 1500 one-to-many queries)."""

    num_queries: int = 300  # num_queries_one2one: the queries used at inference
    num_queries_one2many: int = 1500  # only sizes query_embed
    two_stage: bool = True
    box_refine: bool = True
    mixed_selection: bool = True


class HDetrTransformer(nn.Module):
    """``transformer.*`` of H-DETR: level_embed, encoder, decoder, and either the two-stage
    parts (enc_output, enc_output_norm, pos_trans, pos_trans_norm) or ``reference_points``."""

    def __init__(self, cfg: HDetrConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.level_embed = nn.Parameter(torch.zeros(cfg.num_feature_levels, d))
        self.encoder = encoder_for(cfg)
        self.decoder = Decoder(decoder_layer_for(cfg), cfg.dec_layers)
        if cfg.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        else:
            self.reference_points = nn.Linear(d, 2)

    def _queries(
        self, query_embed: Tensor | None, memory: Tensor, pad_mask: Tensor, spatial_shapes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(content queries [B, Q, D], positional queries [B, Q, D], references [B, Q, 2|4]);
        ``query_embed`` is the top-level ``query_embed.weight`` (None for plain two-stage)."""
        cfg, d, b = self.cfg, self.cfg.d_model, memory.shape[0]
        q = cfg.num_queries
        embed = query_embed[:q] if query_embed is not None else None
        if not cfg.two_stage:
            query_pos, tgt = embed.split(d, dim=1)
            query_pos, tgt = query_pos[None].expand(b, -1, -1), tgt[None].expand(b, -1, -1)
            return tgt, query_pos, self.reference_points(query_pos).sigmoid()
        out_memory, proposals = encoder_proposals(memory, pad_mask, spatial_shapes)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class = self.decoder.class_embed[cfg.dec_layers](out_memory)
        enc_coord = self.decoder.bbox_embed[cfg.dec_layers](out_memory) + proposals
        # Deformable DETR ranks proposals by the first class's logit (a known quirk, kept)
        top = torch.topk(enc_class[..., 0], q, dim=1)[1]
        coords = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4))
        pos_trans = self.pos_trans_norm(self.pos_trans(proposal_position_embedding(coords, d // 2)))
        query_pos, tgt = pos_trans.split(d, dim=2)
        if cfg.mixed_selection:
            tgt = embed[None].expand(b, -1, -1)
        return tgt, query_pos, coords.sigmoid()

    def decode(
        self, query_embed: Tensor | None, memory: Tensor, pad_mask: Tensor, spatial_shapes: Tensor, ratios: Tensor
    ) -> tuple[Tensor, Tensor]:
        """-> (last decoder layer output [B, Q, D], the references it used [B, Q, 2|4])."""
        tgt, query_pos, references = self._queries(query_embed, memory, pad_mask, spatial_shapes)
        return self.decoder(tgt, query_pos, references, memory, spatial_shapes, ratios, pad_mask)


class HDetr(NativeDetector):
    """H-DETR with a ResNet backbone. Top-level ``query_embed.weight`` is
    [one2one + one2many, D] with mixed selection, [..., 2D] without two-stage, absent otherwise."""

    pos_temperature = 10000.0
    pos_offset = 0.5  # Deformable DETR's PositionEmbeddingSine subtracts 0.5 before normalising

    def __init__(self, cfg: HDetrConfig):
        if cfg.two_stage and not cfg.box_refine:
            raise ValueError("two_stage needs box_refine (as in Deformable DETR)")
        super().__init__(cfg)
        self.transformer = HDetrTransformer(cfg)
        total = cfg.num_queries + cfg.num_queries_one2many
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(total, 2 * cfg.d_model)
        elif cfg.mixed_selection:
            self.query_embed = nn.Embedding(total, cfg.d_model)
        else:
            self.query_embed = None
        # the originals hang the heads on the decoder too; their state dicts list both names
        if cfg.box_refine:
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if cfg.two_stage:
            self.transformer.decoder.class_embed = self.class_embed

    def num_heads(self) -> int:
        return self.cfg.dec_layers + (1 if self.cfg.two_stage else 0)

    def decode(self, memory: Tensor, pad_mask: Tensor, spatial_shapes: Tensor, ratios: Tensor) -> tuple[Tensor, Tensor]:
        embed = self.query_embed.weight if self.query_embed is not None else None
        return self.transformer.decode(embed, memory, pad_mask, spatial_shapes, ratios)
