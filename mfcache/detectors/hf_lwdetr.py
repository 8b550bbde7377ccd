"""The ViT-backbone DETRs: LW-DETR (plain ViT) and RF-DETR (windowed DINOv2).

Neither has a transformer encoder: a ViT backbone's chosen layers are concatenated and
mapped by a C2f projector to ``d_model`` at one stride per ``projector_scale_factors``
entry (LW-DETR: 2.0 -> patch/2, 1.0 -> patch, 0.5 -> 2*patch; RF-DETR: one level at the
patch stride, 14 or 16). Those projector maps, flattened, *are* the memory the two-stage
query selection and the deformable decoder attend to; a pre-hook on the decoder reads them
(``encoder_hidden_states [B, sum(h*w), d_model]``) with ``spatial_shapes_list`` and the
per-level padding mask (the nearest-downsampled ``pixel_mask``).

Boxes are normalised to each image's unpadded extent, as in Deformable DETR (proposals are
divided by the valid size, reference points multiplied by ``valid_ratios``), so the base
class's default scaling applies.

Inputs. The ViT has no attention mask and interpolates its position embeddings to the
canvas, so padding changes every real token: an image's outputs would depend on its batch
mates' sizes. Both processors resize to a fixed square (LW-DETR: DeformableDetrImageProcessor
``size={"height": 640, "width": 640}``; RF-DETR: RfDetrImageProcessor at the model's
resolution), so mfcache requires ``Preprocess.fixed_size`` and pads to a multiple of
``patch * windows per side`` (the windowed attention's requirement) and the coarsest stride.
RfDetrImageProcessor rescales to [0, 1] first and resizes the float image without
antialiasing: its own pixel path, ``resize="float-noaa"``.

C1: a ViT has no stride-4 map (``c1_channels = 0``; heads run with ``use_c1 = false``).
``RfDetrForInstanceSegmentation`` (``architectures`` in config.json) is frozen as its
detector part; its own mask head is not used.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from torch import Tensor, nn

from mfcache.detectors.base import DetectorOutput, Preprocess
from mfcache.detectors.hf_base import HFDetector
from mfcache.errors import MfcacheError


def _side(value: Any) -> int:
    """A square patch/size given as an int or a pair."""
    if isinstance(value, (list, tuple)):
        if len({int(v) for v in value}) != 1:
            raise MfcacheError(f"non-square patch size {value!r} is not supported")
        return int(value[0])
    return int(value)


class HFViTDetrFamily(HFDetector):
    """Shared adapter of LW-DETR and RF-DETR; subclasses say where the model parts are."""

    # Both processors: a fixed square resize with ImageNet normalisation
    default_preprocess: ClassVar[Preprocess] = Preprocess(fixed_size=(640, 640))

    def __init__(self, model: nn.Module, **kwargs: Any):
        preprocess: Preprocess = kwargs["preprocess"]
        if preprocess.fixed_size is None:
            raise MfcacheError(
                f"{kwargs['spec']}: {self.family} has a ViT backbone without a padding mask, so padding "
                "would change every image's outputs; preprocessing must resize to a fixed size "
                '(preprocessor_config.json size {"height": h, "width": w}, as its processor does)'
            )
        super().__init__(model, **kwargs)

    # ----------------------------------------------------------------- model parts
    def _detection_model(self) -> nn.Module:
        """The ``*Model`` (backbone + projector, query selection, decoder)."""
        return self.model.model

    def _conv_encoder(self) -> nn.Module:
        return self._detection_model().backbone  # ViT + projector

    def _backbone(self) -> nn.Module:
        return self._conv_encoder().backbone  # the ViT itself (no stride-4 stage: no C1)

    def _windows_per_side(self) -> int:
        raise NotImplementedError

    def _patch(self) -> int:
        return _side(self.model.config.backbone_config.patch_size)

    def _strides(self) -> list[int]:
        raise NotImplementedError

    def _strides_and_c1(self) -> tuple[list[int], int]:
        return self._strides(), 0

    def _pad_multiple(self, strides: list[int]) -> int:
        """Patches per side must split into the attention windows; every level must divide evenly."""
        multiple = self._patch() * self._windows_per_side()
        for stride in strides:
            multiple = math.lcm(multiple, stride)
        return multiple

    # ----------------------------------------------------------------- hooks and output
    def _install_hooks(self) -> None:
        self._handles.append(
            self._detection_model().decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True)
        )

    def _decoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stash["memory"] = kwargs["encoder_hidden_states"]  # [B, sum(h*w), d_model], projector maps
        self._stash["spatial_shapes"] = [(int(h), int(w)) for h, w in kwargs["spatial_shapes_list"]]
        self._stash["level_mask"] = kwargs["encoder_attention_mask"]  # [B, sum(h*w)], True = real

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        return self._stashed_output(raw, pixel_mask, self._stash["memory"])  # no C1: a ViT has no stride-4 map


class HFLwDetr(HFViTDetrFamily):
    """LW-DETR: plain ViT (window attention in ``num_windows`` windows, a perfect square)."""

    family = "lw_detr"
    model_class = "LwDetrForObjectDetection"

    def _windows_per_side(self) -> int:
        return math.isqrt(int(self.model.config.backbone_config.num_windows))

    def _strides(self) -> list[int]:
        patch, scales = self._patch(), self.model.config.projector_scale_factors
        strides = [patch / float(s) for s in scales]
        if not scales or any(s != int(s) for s in strides):
            raise MfcacheError(
                f"lw_detr: projector_scale_factors {list(scales)} with patch size {patch} do not give whole strides"
            )
        return [int(s) for s in strides]


class HFRfDetr(HFViTDetrFamily):
    """RF-DETR: windowed DINOv2 (``num_windows`` per side), one projector level at the patch
    stride; ``RfDetrForInstanceSegmentation`` checkpoints are frozen as their detector."""

    family = "rf_detr"
    model_class = "RfDetrForObjectDetection"
    model_classes: ClassVar[tuple[str, ...]] = ("RfDetrForObjectDetection", "RfDetrForInstanceSegmentation")
    # RfDetrImageProcessor: rescale, then resize the float image (no antialiasing), then normalise
    default_preprocess: ClassVar[Preprocess] = Preprocess(fixed_size=(560, 560), resize="float-noaa")

    def _detection_model(self) -> nn.Module:
        inner = self.model.model
        return inner.model if hasattr(inner, "class_embed") else inner  # *ForInstanceSegmentation wraps the detector

    def _windows_per_side(self) -> int:
        return int(self.model.config.backbone_config.num_windows)

    def _strides(self) -> list[int]:
        return [self._patch()]  # RfDetrModel flattens the single projector map

    def _backbone_features(self, pixel_values: Tensor, pixel_mask: Tensor) -> list[Tensor]:
        return [self._conv_encoder()(pixel_values, pixel_mask)[0]]
