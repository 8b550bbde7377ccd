"""Deformable DETR (plain, with_box_refine, two_stage): multi-scale memory, flat already.

Memory is ``encoder_last_hidden_state`` ``[B, sum(h*w), D]``; level shapes and the
per-level padding mask come from a pre-hook on ``model.model.encoder``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mfcache.detectors.base import DetectorOutput
from mfcache.detectors.hf_base import HFDetector


class HFDeformableDetr(HFDetector):
    """Deformable DETR (plain, with_box_refine, two_stage)."""

    family = "deformable_detr"
    model_class = "DeformableDetrForObjectDetection"

    def _num_queries(self) -> int:
        config = self.model.config
        return int(config.two_stage_num_proposals if config.two_stage else config.num_queries)

    def _install_hooks(self) -> None:
        self._handles.append(
            self.model.model.encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True)
        )

    def _encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        shapes = kwargs.get("spatial_shapes_list")
        if shapes is None:
            shapes = [tuple(s) for s in kwargs["spatial_shapes"].tolist()]
        self._stash["spatial_shapes"] = [(int(h), int(w)) for h, w in shapes]
        self._stash["level_mask"] = kwargs["attention_mask"]  # [B, sum(h*w)], True = real

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        return self._stashed_output(raw, pixel_mask, raw.encoder_last_hidden_state)
