"""The one head class: parts chosen by ``build_head``, wired in the order of design §5 (docs/design.md).

1. F = fused map (image encoder on E, channel mapper, C1 neck) at stride 4, computed for each
   image on its own valid maps: a list of B maps ``[d', h_b, w_b]``, never padded to a batch.
2. Queries -> d' (linear; skipped by the FCN predictor unless a box encoder reads them), then the query encoder's image-level layers on all K queries of
   each image; then the selected queries ``[N, d']``.
3. RoI features of the selected boxes (when a part needs them), + a learned position,
   through the box encoder (query token prepended) and the query encoder's box layers.
4. The mask predictor -> ``[N, 1, M, M]``; the mask-IoU head -> quality ``[N]`` (optional).

Steps 3-4 run on the whole batch in training; at inference a head with RoI tokens runs them
one image at a time (memory bounded by one image's detections; the same values).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfcache.heads.base import HeadOutput, MaskHead
from mfcache.heads.box_encoder import BoxEncoder
from mfcache.heads.fusion import FusedMap
from mfcache.heads.query_encoder import QueryEncoder
from mfcache.heads.region import FUSED_STRIDE, selected_rois
from mfcache.heads.roi import per_image, roi_align
from mfcache.heads.scoring import MaskIoUHead


class ComposedHead(MaskHead):
    """See the module docstring; ``forward`` follows :class:`MaskHead`."""

    def __init__(
        self,
        *,
        levels: tuple[int, ...],
        uses_c1: bool,
        roi_size: int,
        feature_size: int,
        fusion: FusedMap,
        query_proj: nn.Module | None,
        query_encoder: QueryEncoder,
        box_encoder: BoxEncoder | None,
        predictor: nn.Module,
        scorer: MaskIoUHead | None,
        needs_roi_features: bool,
        channels: int,
    ):
        super().__init__()
        self.levels, self.uses_c1, self.roi_size, self.feature_size = levels, uses_c1, roi_size, feature_size
        self.fusion, self.query_proj, self.query_encoder = fusion, query_proj, query_encoder
        self.box_encoder, self.predictor, self.scorer = box_encoder, predictor, scorer
        self.uses_tokens = box_encoder is not None or len(query_encoder.box_layers) > 0
        self.needs_roi_features = needs_roi_features or scorer is not None or self.uses_tokens
        self.roi_pos = (
            nn.Parameter(torch.randn(feature_size * feature_size, channels) * 0.02) if self.uses_tokens else None
        )

    def forward(
        self,
        queries: Tensor,
        boxes: Tensor,
        levels: list[Tensor],
        c1: Tensor | None,
        select: Tensor | None = None,
        *,
        level_hw: Tensor | None = None,
        c1_hw: Tensor | None = None,
    ) -> HeadOutput:
        fused = self.fusion(levels, c1, level_hw, c1_hw)
        q = None
        if self.query_proj is not None:  # None: a predictor that ignores queries (fcn)
            q = self.query_encoder.image(self.query_proj(queries))  # all K queries of each image
            q = q.reshape(-1, q.shape[-1]) if select is None else q[select]
        rois = selected_rois(boxes, select)
        if self.training or not self.uses_tokens:
            return self.boxes_stage(fused, q, rois)
        # inference with RoI tokens: one image's boxes at a time, so memory (a transformer over
        # every box's M x M tokens) is bounded by one image's detections, whatever eval.batch_size
        parts = [
            (sel, self.boxes_stage(fused, None if q is None else q[sel], rois[sel]))
            for _, sel in per_image(rois[:, 0].long())
        ]
        if not parts:
            return self.boxes_stage(fused, q, rois)
        logits = parts[0][1].mask_logits.new_empty(len(rois), *parts[0][1].mask_logits.shape[1:])
        quality = None if self.scorer is None else logits.new_empty(len(rois))
        for sel, out in parts:
            logits[sel] = out.mask_logits
            if quality is not None:
                quality[sel] = out.quality
        return HeadOutput(mask_logits=logits, quality=quality)

    def boxes_stage(self, fused: list[Tensor], q: Tensor | None, rois: Tensor) -> HeadOutput:
        """Steps 3-4 for ``rois [N, 5]`` (batch index into ``fused``, xyxy) and their queries
        ``q [N, d']`` (None for a predictor that ignores them)."""
        feats = None
        if self.needs_roi_features:
            feats = roi_align(fused, rois, self.feature_size, 1.0 / FUSED_STRIDE, sampling_ratio=2)
        if self.uses_tokens:
            tokens = feats.flatten(2).transpose(1, 2) + self.roi_pos
            if self.box_encoder is not None:
                q, tokens = self.box_encoder(q, tokens)
            if q is not None:
                q = self.query_encoder.box(q, tokens)
            feats = tokens.transpose(1, 2).reshape(feats.shape)
        logits = self.predictor(queries=q, roi_features=feats, fused=fused, rois=rois)
        quality = self.scorer(feats, logits) if self.scorer is not None else None
        return HeadOutput(mask_logits=logits, quality=quality)
