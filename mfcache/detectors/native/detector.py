"""What H-DETR and DINO share: backbone -> input projections -> deformable encoder ->
(family decoder) -> last-layer heads, wrapped as an mfcache :class:`Detector`.

Parameter names follow the original repos (``backbone.0.body.*``, ``input_proj.N.{0,1}``,
``transformer.*``, ``class_embed.N``, ``bbox_embed.N``) so ``load_state_dict`` maps 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfcache.detectors.base import Detector, DetectorOutput
from mfcache.detectors.native.backbone import build_backbone
from mfcache.detectors.native.deformable_transformer import MLP, clones, refine_boxes, valid_ratios
from mfcache.detectors.native.position import image_position_embedding


@dataclass(frozen=True)
class NativeConfig:
    """Architecture options shared by the family configs (defaults: the published R50 models)."""

    backbone: str = "resnet50"
    window: int = 0  # Swin window size; 0: the backbone's default (see swin.SWINS)
    dilation: bool = False  # ResNet DC5: layer4 dilated, stride 16
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    num_feature_levels: int = 4
    backbone_levels: int = 3  # C3-C5 (4-scale); 4 = C2-C5 (DINO 5-scale)
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_classes: int = 91

    @property
    def return_layers(self) -> tuple[int, ...]:
        return tuple(range(5 - self.backbone_levels, 5))


def input_projections(in_channels: list[int], num_levels: int, d_model: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 conv + GroupNorm per extra level."""
    groups = min(32, d_model)
    projs = [nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(groups, d_model)) for c in in_channels]
    c = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projs.append(
            nn.Sequential(nn.Conv2d(c, d_model, kernel_size=3, stride=2, padding=1), nn.GroupNorm(groups, d_model))
        )
        c = d_model
    return nn.ModuleList(projs)


def _level_mask(pad_mask: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(pad_mask[None].float(), size=size).to(torch.bool)[0]


class NativeDetector(Detector):
    """Subclasses set ``self.transformer`` (with ``level_embed`` and ``encoder``), implement
    :meth:`decode`, and set the position-embedding constants."""

    pos_temperature: float = 10000.0
    pos_offset: float = 0.5

    def __init__(self, cfg: NativeConfig):
        super().__init__()
        if not 1 <= cfg.backbone_levels <= 4 or cfg.num_feature_levels < cfg.backbone_levels:
            raise ValueError("need 1 <= backbone_levels <= 4 and num_feature_levels >= backbone_levels")
        if cfg.d_model % cfg.nheads or cfg.d_model % 2 or min(cfg.enc_layers, cfg.dec_layers) < 1:
            raise ValueError("need d_model divisible by nheads (and even) and at least one encoder and decoder layer")
        self.cfg = cfg
        body = build_backbone(cfg.backbone, cfg.return_layers, window=cfg.window, dilation=cfg.dilation)
        self.backbone = nn.ModuleList([body])
        self.input_proj = input_projections(body.num_channels, cfg.num_feature_levels, cfg.d_model)
        num_pred = self.num_heads()
        self.class_embed = clones(nn.Linear(cfg.d_model, cfg.num_classes), num_pred)
        self.bbox_embed = clones(MLP(cfg.d_model, cfg.d_model, 4, 3), num_pred)
        strides = body.strides + [
            body.strides[-1] * 2 ** (i + 1) for i in range(cfg.num_feature_levels - cfg.backbone_levels)
        ]
        self.strides = tuple(strides)
        self.c1_channels = body.c1_channels

    def num_heads(self) -> int:
        """How many (class, box) head pairs the checkpoint holds."""
        return self.cfg.dec_layers

    def decode(self, memory: Tensor, pad_mask: Tensor, spatial_shapes: Tensor, ratios: Tensor) -> tuple[Tensor, Tensor]:
        """memory [B, S, D], pad_mask [B, S], spatial_shapes [L, 2], valid ratios [B, L, 2]
        -> (queries the heads read [B, Q, D], references the last decoder layer used [B, Q, 2|4])."""
        raise NotImplementedError

    def c1_stem(self) -> nn.Module:
        """The backbone's C1 maker alone (ResNet stem + layer1, or Swin patch embedding + stage 0's
        blocks): ``[B, 3, H, W]`` -> ``[B, C1, H/4, W/4]``, exactly the c1 of :meth:`forward`."""
        return self.backbone[0].c1_stem()

    def train(self, mode: bool = True) -> NativeDetector:
        """A frozen detector stays in eval mode whatever a parent module asks."""
        return super().train(False)

    def _levels(self, pixels: Tensor, pad_mask: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """c1, and per level: projected map [B, D, h, w], padding mask [B, h, w], position [B, D, h, w]."""
        c1, feats = self.backbone[0](pixels)
        srcs, masks = [], []
        for lvl, proj in enumerate(self.input_proj):
            if lvl < len(feats):
                src = proj(feats[lvl])
            else:
                src = proj(feats[-1] if lvl == len(feats) else srcs[-1])
            srcs.append(src)
            masks.append(_level_mask(pad_mask, src.shape[-2:]))
        pos = [
            image_position_embedding(
                m, self.cfg.d_model // 2, temperature=self.pos_temperature, offset=self.pos_offset
            ).to(s.dtype)
            for s, m in zip(srcs, masks)
        ]
        return c1, srcs, masks, pos

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        """pixel_values [B, 3, H, W] normalised, pixel_mask [B, H, W] True on real pixels."""
        with torch.no_grad():
            c1, srcs, masks, pos = self._levels(pixel_values, ~pixel_mask.bool())
            shapes = torch.tensor([s.shape[-2:] for s in srcs], dtype=torch.long, device=pixel_values.device)
            src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
            pos_flat = torch.cat(
                [p.flatten(2).transpose(1, 2) + self.transformer.level_embed[lvl] for lvl, p in enumerate(pos)], 1
            )
            pad_flat = torch.cat([m.flatten(1) for m in masks], 1)
            ratios = valid_ratios(masks)
            memory = self.transformer.encoder(src_flat, pos_flat, shapes, ratios, pad_flat)
            queries, references = self.decode(memory, pad_flat, shapes, ratios)
            last = self.cfg.dec_layers - 1
            logits = self.class_embed[last](queries)
            boxes = refine_boxes(
                self.bbox_embed[last],
                queries,
                references,  # cxcywh, relative to the real image
                self.transformer.decoder.refine_eps,
            )
        real_hw = torch.stack([pixel_mask.any(2).sum(1), pixel_mask.any(1).sum(1)], 1).to(boxes.dtype)
        scale = torch.stack([real_hw[:, 1], real_hw[:, 0]] * 2, 1)[:, None]
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1) * scale
        valid = torch.stack([torch.stack([(~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)], 1) for m in masks], 1)
        return DetectorOutput(
            queries=queries, logits=logits, boxes=xyxy, memory=memory, spatial_shapes=shapes, valid=valid, c1=c1
        )
