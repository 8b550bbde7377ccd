"""The RT-DETR family: RT-DETR, RT-DETRv2, D-FINE, DEIMv2.

These models return their encoder output as a *list* of maps ``[B, C_enc, h_l, w_l]``
(``C_enc = encoder_hidden_dim``), then project each with ``decoder_input_proj`` to
``d_model`` (adding extra stride-2 levels when ``num_feature_levels`` asks) and flatten
them into the memory the decoder attends to. mfcache caches *that* memory
``[B, sum(h*w), d_model]``: it is what the queries were trained against, it has the
queries' width, and it covers every level the decoder uses. A pre-hook on
``model.model.decoder`` reads it together with ``spatial_shapes_list``.

They ignore ``pixel_mask``: their processors resize every image to one fixed size
(``Preprocess.fixed_size``, no normalisation), boxes are normalised to the whole input
canvas (``boxes_relative_to_canvas``), and each level's valid size is
``ceil(input / stride)`` (equal to the level when the fixed size is a multiple of the
coarsest stride, as 640 is).

C1 is the first stage of the backbone (RT-DETR's ResNet-vd, HGNetV2: stride 4); DEIMv2's
DINOv3 backbones have no stride-4 map (``c1_channels = 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mfcache.detectors.base import DetectorOutput, Preprocess
from mfcache.detectors.hf_base import HFDetector, valid_from_strides
from mfcache.errors import MfcacheError


class HFRTDetrFamily(HFDetector):
    """Shared adapter of the RT-DETR family; subclasses name the class (and DEIMv2 its backbone)."""

    boxes_relative_to_canvas = True
    # RTDetrImageProcessor's defaults: plain 640x640 resize, rescale to [0, 1], no normalisation
    default_preprocess = Preprocess(fixed_size=(640, 640), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def __init__(self, model: nn.Module, **kwargs: Any):
        super().__init__(model, **kwargs)
        anchor = getattr(model.config, "anchor_image_size", None)
        if anchor:
            anchor_hw = (int(anchor), int(anchor)) if isinstance(anchor, int) else tuple(int(v) for v in anchor)
            if self.info.preprocess.fixed_size is None or tuple(self.info.preprocess.fixed_size) != anchor_hw:
                raise MfcacheError(
                    f"{self.info.spec}: the model's anchors are fixed for {anchor_hw[0]}x"
                    f"{anchor_hw[1]} inputs; preprocessing must resize to exactly that size"
                )

    def _install_hooks(self) -> None:
        self._handles.append(
            self.model.model.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True)
        )

    def _decoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stash["memory"] = kwargs["encoder_hidden_states"]  # [B, sum(h*w), d_model]
        self._stash["spatial_shapes"] = [(int(h), int(w)) for h, w in kwargs["spatial_shapes_list"]]

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        memory = self._stash["memory"]
        shapes = torch.as_tensor(self._stash["spatial_shapes"], dtype=torch.long, device=memory.device)
        return DetectorOutput(
            queries=raw.last_hidden_state,
            logits=raw.logits,
            boxes=self.boxes_to_input_pixels(raw.pred_boxes, pixel_mask),
            memory=memory,
            spatial_shapes=shapes,
            valid=valid_from_strides(pixel_mask, self.info.strides, shapes),
            c1=self._stash.get("c1"),
        )


class HFRTDetr(HFRTDetrFamily):
    family = "rt_detr"
    model_class = "RTDetrForObjectDetection"


class HFRTDetrV2(HFRTDetrFamily):
    family = "rt_detr_v2"
    model_class = "RTDetrV2ForObjectDetection"


class HFDFine(HFRTDetrFamily):
    family = "d_fine"
    model_class = "DFineForObjectDetection"


class HFDeimV2(HFRTDetrFamily):
    """DEIMv2: HGNetV2 (``conv_encoder.model``) or DINOv3 (``conv_encoder.backbone``) backbones."""

    family = "deimv2"
    model_class = "Deimv2ForObjectDetection"

    def _conv_encoder(self) -> nn.Module:
        return self.model.model.conv_encoder

    def _backbone(self) -> nn.Module:
        encoder = self._conv_encoder()
        return encoder.model if hasattr(encoder, "model") else encoder.backbone

    def _backbone_features(self, pixel_values: Tensor, pixel_mask: Tensor) -> list[Tensor]:
        return list(self._conv_encoder()(pixel_values))
