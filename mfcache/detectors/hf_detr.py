"""Single-scale DETRs: DETR, Conditional DETR, DAB-DETR.

All three project the backbone's *last* output map (stride 32 for a ResNet) with
``model.model.input_projection`` and run a plain transformer encoder over it, so memory is
one level ``[B, h*w, D]``. Hooks:

- ``input_projection`` (forward hook): the level's (h, w) of the padded batch;
- ``model.model.encoder`` (pre-hook): ``attention_mask [B, h*w]``, the model's own
  nearest-downsampled ``pixel_mask`` (real tokens = ``ceil(input / 32)`` per side);
- ``model.model.encoder`` (forward hook): its ``last_hidden_state``, the memory (DAB-DETR
  returns ``encoder_last_hidden_state`` only with ``output_hidden_states``).

DETR classifies with a softmax over ``num_labels + 1`` classes, the last being "no object"
(``sigmoid=False``); Conditional and DAB-DETR use sigmoid focal classification.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mfcache.detectors.base import DetectorOutput
from mfcache.detectors.hf_base import HFDetector


class HFSingleScaleDetr(HFDetector):
    """Shared adapter of the single-scale DETRs; subclasses name the class and backbone path."""

    def _num_levels(self) -> int:
        return 1

    def _select_levels(self, backbone_strides: list[int]) -> list[int]:
        return [backbone_strides[-1]]  # the models use only the last backbone map

    def _install_hooks(self) -> None:
        inner = self.model.model
        self._handles += [
            inner.input_projection.register_forward_hook(self._projection_hook),
            inner.encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True),
            inner.encoder.register_forward_hook(self._encoder_hook),
        ]

    def _projection_hook(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._stash["spatial_shapes"] = [tuple(int(s) for s in output.shape[-2:])]

    def _encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stash["level_mask"] = kwargs["attention_mask"]  # [B, h*w], True = real

    def _encoder_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._stash["memory"] = output[0]  # last_hidden_state [B, h*w, D]

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        return self._stashed_output(raw, pixel_mask, self._stash["memory"])


class HFDetr(HFSingleScaleDetr):
    """DETR: softmax classification with a trailing "no object" class."""

    family = "detr"
    model_class = "DetrForObjectDetection"
    sigmoid = False


class HFConditionalDetr(HFSingleScaleDetr):
    """Conditional DETR: sigmoid focal classification."""

    family = "conditional_detr"
    model_class = "ConditionalDetrForObjectDetection"


class HFDabDetr(HFSingleScaleDetr):
    """DAB-DETR: sigmoid classification; queries repeat over ``num_patterns`` when set."""

    family = "dab-detr"  # config.json's model_type, which every family name is
    model_class = "DabDetrForObjectDetection"

    def _conv_encoder(self) -> nn.Module:
        return self.model.model.backbone.conv_encoder  # wrapped with the position embedding

    def _d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def _num_queries(self) -> int:
        config = self.model.config
        return int(config.num_queries) * max(1, int(config.num_patterns))
