"""DINO-DETR (``two_stage_type="standard"``), inference path.

Encoder proposals are ranked by their best class logit; the top ``num_queries`` boxes are
the decoder's initial references and ``transformer.tgt_embed`` the content queries
(``embed_init_tgt``). Each decoder layer derives its positional query from its reference
box (``ref_point_head`` on a sine embedding); the heads read ``decoder.norm`` of the last
layer's output. Denoising (``label_enc``) is training-only: its weight is loaded, never used.
Per-layer heads are loaded one per layer, which covers both shared (``dec_pred_*_share``,
the published default: equal copies in the state dict) and unshared checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mfcache.detectors.native.deformable_transformer import (
    MLP,
    DinoDecoder,
    decoder_layer_for,
    encoder_for,
    encoder_proposals,
)
from mfcache.detectors.native.detector import NativeConfig, NativeDetector


@dataclass(frozen=True)
class DinoConfig(NativeConfig):
    """Defaults: the released DINO-4scale R50 model (900 queries, dim_feedforward 2048)."""

    num_queries: int = 900
    dn_labelbook_size: int = 91  # label_enc rows = dn_labelbook_size + 1


class DinoTransformer(nn.Module):
    """``transformer.*`` of DINO: level_embed, encoder, decoder (with ref_point_head, norm),
    enc_output, enc_output_norm, enc_out_class_embed, enc_out_bbox_embed, tgt_embed."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.level_embed = nn.Parameter(torch.zeros(cfg.num_feature_levels, d))
        self.encoder = encoder_for(cfg)
        self.decoder = DinoDecoder(decoder_layer_for(cfg), cfg.dec_layers, d_model=d)
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_class_embed = nn.Linear(d, cfg.num_classes)
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)

    def decode(self, memory: Tensor, pad_mask: Tensor, spatial_shapes: Tensor, ratios: Tensor) -> tuple[Tensor, Tensor]:
        """-> (decoder.norm(last layer output) [B, Q, D], references the last layer used [B, Q, 4])."""
        b = memory.shape[0]
        out_memory, proposals = encoder_proposals(memory, pad_mask, spatial_shapes)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class = self.enc_out_class_embed(out_memory)
        enc_coord = self.enc_out_bbox_embed(out_memory) + proposals
        top = torch.topk(enc_class.max(-1)[0], self.cfg.num_queries, dim=1)[1]
        references = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
        tgt = self.tgt_embed.weight[None].expand(b, -1, -1)
        return self.decoder(tgt, None, references, memory, spatial_shapes, ratios, pad_mask)


class Dino(NativeDetector):
    """DINO with a ResNet backbone; heads ``class_embed.N`` / ``bbox_embed.N`` (N < dec_layers),
    also listed as ``transformer.decoder.{class,bbox}_embed.N`` in the originals' state dicts."""

    pos_temperature = 20.0  # DINO configs: pe_temperatureH = pe_temperatureW = 20
    pos_offset = 0.0  # PositionEmbeddingSineHW normalises without the -0.5 shift

    def __init__(self, cfg: DinoConfig):
        super().__init__(cfg)
        self.transformer = DinoTransformer(cfg)
        self.label_enc = nn.Embedding(cfg.dn_labelbook_size + 1, cfg.d_model)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed

    def decode(self, memory: Tensor, pad_mask: Tensor, spatial_shapes: Tensor, ratios: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer.decode(memory, pad_mask, spatial_shapes, ratios)
