"""The shared base of mfcache's transformers adapters (one module per family: ``hf_*.py``).

:class:`HFDetector` holds what every family shares: freezing, the hooks (registered once,
their results stashed per forward), the C1 map, stride discovery, box conversion and the
fingerprint. A family is a small subclass that names its transformers class and says
where its queries, memory and level shapes are; :data:`mfcache.detectors.hf.ADAPTERS`
maps ``config.json``'s ``model_type`` to it.

Boxes. DETR-style models predict ``pred_boxes`` as cxcywh normalised to each image's
*unpadded* extent (Deformable DETR's decoder multiplies its reference points by the
per-level ``valid_ratios``; DETR's original training normalised targets by the unpadded
size; ``post_process_object_detection`` scales by the image size). So by default the
adapter multiplies by each image's valid input (w, h), read from ``pixel_mask`` (padding
is bottom/right, as every DETR processor does). Families that ignore ``pixel_mask``
(RT-DETR and its descendants) normalise to the whole canvas and say so with
``boxes_relative_to_canvas``. (transformers' own image processor, when padding *training*
annotations, rescales boxes to the padded canvas; a checkpoint fine-tuned that way on
padded batches is inconsistent with its own post-processing. We follow the architecture.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mfcache.detectors.base import Detector, DetectorInfo, DetectorOutput, Preprocess

_PROBE_SIZE = 256  # side of the blank image used to measure strides of unknown backbones


def _freeze(model: nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    # the same arithmetic as transformers' center_to_corners_format, so results match bit for bit
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def input_hw_from_mask(pixel_mask: Tensor) -> Tensor:
    """[B, 2] (h, w) of each image's real (unpadded) extent; padding is bottom/right."""
    mask = pixel_mask.bool()
    return torch.stack([mask.any(2).sum(1), mask.any(1).sum(1)], dim=1)


def valid_from_strides(pixel_mask: Tensor, strides: tuple[int, ...], shapes: Tensor) -> Tensor:
    """``[B, L, 2]`` ceil(input / stride) per level, within the level ``shapes [L, 2]``: the valid
    sizes of models that ignore ``pixel_mask`` (their levels cover the whole canvas)."""
    hw = input_hw_from_mask(pixel_mask)
    s = torch.as_tensor(strides, device=hw.device)
    valid = torch.div(hw[:, None, :] + s[None, :, None] - 1, s[None, :, None], rounding_mode="floor")
    return torch.minimum(valid, shapes.to(hw.device)[None])


def valid_from_level_mask(mask: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """``mask [B, sum(h*w)]`` (True = real token, levels flattened back to back) ->
    ``[B, L, 2]`` real (h, w) of each level, counted on the masks the model itself built."""
    mask = mask.bool()
    out, start = [], 0
    for h, w in shapes:
        m = mask[:, start : start + h * w].view(-1, h, w)
        out.append(torch.stack([m[:, :, 0].sum(1), m[:, 0, :].sum(1)], dim=1))
        start += h * w
    return torch.stack(out, dim=1)


class HFDetector(Detector):
    """A frozen transformers detector. Subclasses set the class attributes and implement
    :meth:`_hook_points` (where to listen) and :meth:`_collect` (raw output -> DetectorOutput).
    """

    family: ClassVar[str]
    model_class: ClassVar[str]  # name of the transformers class, imported lazily
    # every class a checkpoint of this family may name in config.json's ``architectures``
    model_classes: ClassVar[tuple[str, ...]] = ()
    sigmoid: ClassVar[bool] = True
    boxes_relative_to_canvas: ClassVar[bool] = False  # True: pred_boxes normalised to the padded input
    default_preprocess: ClassVar[Preprocess] = Preprocess()  # the family's image-processor defaults
    _c1_output_index = 0  # which output of the C1 module is the map, when it returns several (Swin: 1)

    def __init__(
        self, model: nn.Module, *, spec: str, preprocess: Preprocess, weights_sha256: str, trained: bool = True
    ):
        super().__init__()
        self.model = model
        _freeze(model)
        self._stash: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._c1_module = self._find_c1_module()
        self._c1_handle = None
        if self._c1_module is not None:
            self._c1_handle = self._c1_module.register_forward_hook(self._c1_hook)
            self._handles.append(self._c1_handle)
        self._install_hooks()
        strides, c1_channels = self._strides_and_c1()
        multiple = self._pad_multiple(strides)
        if preprocess.pad_divisor % multiple:
            # padding to a multiple of the coarsest stride is what makes valid == level_shapes
            preprocess = replace(preprocess, pad_divisor=multiple)
        config = model.config
        self.info = DetectorInfo(
            spec=spec,
            family=self.family,
            d_model=self._d_model(),
            num_queries=self._num_queries(),
            label_names=tuple(str(config.id2label[i]) for i in range(int(config.num_labels))),
            strides=tuple(int(s) for s in strides),
            c1_channels=int(c1_channels),
            sigmoid=self.sigmoid,
            weights_sha256=weights_sha256,
            preprocess=preprocess,
            trained=trained,
        )

    @classmethod
    def model_class_for(cls, architectures: list[str] | None) -> str:
        """The transformers class to build: the checkpoint's own (``architectures[0]``) where the
        family accepts it, else :attr:`model_class`."""
        named = (architectures or [None])[0]
        return named if named in cls.model_classes else cls.model_class

    # ----------------------------------------------------------------- for subclasses
    def _pad_multiple(self, strides: list[int]) -> int:
        """What the padded canvas must be a multiple of: by default the coarsest stride."""
        return strides[-1]

    def _install_hooks(self) -> None:
        """Register the family's own hooks (append handles to ``self._handles``)."""

    def _num_queries(self) -> int:
        return int(self.model.config.num_queries)

    def _d_model(self) -> int:
        return int(self.model.config.d_model)

    def _select_levels(self, backbone_strides: list[int]) -> list[int]:
        """Strides of the levels the detector attends to, given its backbone outputs' strides:
        by default the first ``_num_levels()``, extra levels by 3x3 stride-2 convs on the last."""
        num_levels = self._num_levels()
        strides = list(backbone_strides[:num_levels])
        while len(strides) < num_levels:
            strides.append(strides[-1] * 2)
        return strides

    def _conv_encoder(self) -> nn.Module:
        """transformers' ``*ConvEncoder`` (backbone + pixel-mask downsampling); most families
        keep it at ``model.model.backbone``."""
        return self.model.model.backbone

    def _backbone(self) -> nn.Module:
        """The backbone network itself (HF ``ResNetBackbone`` or an unwrapped timm model)."""
        return self._conv_encoder().model

    def _backbone_features(self, pixel_values: Tensor, pixel_mask: Tensor) -> list[Tensor]:
        """Backbone feature maps that feed the encoder (used only to probe strides)."""
        return [f for f, _ in self._conv_encoder()(pixel_values, pixel_mask)]

    def _num_levels(self) -> int:
        return int(self.model.config.num_feature_levels)

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        raise NotImplementedError

    def _stashed_output(
        self, raw: Any, pixel_mask: Tensor, memory: Tensor, logits: Tensor | None = None
    ) -> DetectorOutput:
        """The output of a family whose hooks stashed ``spatial_shapes`` and ``level_mask``: the
        decoder's queries, ``logits`` (default: the model's), boxes in input pixels, ``memory``
        ``[B, sum(h*w), D]``, the levels' shapes and valid sizes, and C1 if one was stashed."""
        shapes = self._stash["spatial_shapes"]
        return DetectorOutput(
            queries=raw.last_hidden_state,
            logits=raw.logits if logits is None else logits,
            boxes=self.boxes_to_input_pixels(raw.pred_boxes, pixel_mask),
            memory=memory,
            spatial_shapes=torch.as_tensor(shapes, dtype=torch.long, device=memory.device),
            valid=valid_from_level_mask(self._stash["level_mask"], shapes),
            c1=self._stash.get("c1"),
        )

    # ----------------------------------------------------------------- shared machinery
    def _find_c1_module(self) -> nn.Module | None:
        """The backbone's first stage, whose output is the stride-4 map."""
        backbone = self._backbone()
        encoder = getattr(backbone, "encoder", None)
        stages = getattr(encoder, "stages", None)
        if stages is not None and len(stages) > 0:  # transformers ResNet / ConvNeXt / ... backbones
            return stages[0]
        swin = getattr(getattr(backbone, "swin", None), "encoder", None)
        if swin is not None and len(swin.layers) > 0:  # transformers Swin: (tokens, [B, C, H/4, W/4] map, ...)
            self._c1_output_index = 1  # the map before the stage's patch merging (SwinBackbone asks for it)
            return swin.layers[0]
        if hasattr(backbone, "layer1"):  # timm ResNet (FeatureListNet keeps the names)
            return backbone.layer1
        return None

    def c1_stem(self) -> nn.Module | None:
        """The backbone's embedder (stem) followed by its first stage, for transformers
        backbones that have both (ResNet, HGNetV2, ...)."""
        embedder = getattr(self._backbone(), "embedder", None)
        if embedder is None or self._c1_module is None:
            return None
        return nn.Sequential(embedder, self._c1_module).eval()

    def _c1_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._stash["c1"] = output[self._c1_output_index] if isinstance(output, (tuple, list)) else output

    def _strides_and_c1(self) -> tuple[list[int], int]:
        """Level strides (finest first) and C1 channels: from the config for transformers'
        ResNet, else measured on a blank image."""
        config = self.model.config
        bc = getattr(config, "backbone_config", None)
        if bc is not None and getattr(bc, "model_type", None) == "resnet" and self._c1_module is not None:
            first = 8 if getattr(bc, "downsample_in_first_stage", False) else 4
            stage_stride = {f"stage{i + 1}": first * 2**i for i in range(len(bc.hidden_sizes))}
            strides = [stage_stride[name] for name in bc.out_features]
            c1_channels = int(bc.hidden_sizes[0])
            c1_stride = first
        else:
            strides, c1_channels, c1_stride = self._probe()
        strides = self._select_levels(strides)
        if c1_stride != 4:
            self._drop_c1()
            c1_channels = 0
        return strides, c1_channels

    def _probe(self) -> tuple[list[int], int, int]:
        param = next(self.model.parameters())
        x = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=param.device, dtype=param.dtype)
        mask = torch.ones(1, _PROBE_SIZE, _PROBE_SIZE, device=param.device, dtype=torch.long)
        try:
            with torch.no_grad():
                feats = self._backbone_features(x, mask)
            c1 = self._stash.get("c1")
        finally:
            self._stash.clear()
        strides = [_PROBE_SIZE // f.shape[-1] for f in feats]
        if c1 is None:
            return strides, 0, 0
        return strides, int(c1.shape[1]), _PROBE_SIZE // int(c1.shape[-1])

    def _drop_c1(self) -> None:
        if self._c1_handle is not None:
            self._c1_handle.remove()
            self._handles.remove(self._c1_handle)
        self._c1_module = self._c1_handle = None

    def remove_hooks(self) -> None:
        """Detach every hook from the wrapped model (the adapter stops working)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def train(self, mode: bool = True) -> HFDetector:
        """A frozen detector stays in eval mode whatever a parent module asks."""
        return super().train(False)

    def boxes_to_input_pixels(self, pred_boxes: Tensor, pixel_mask: Tensor) -> Tensor:
        """Normalised cxcywh (relative to each unpadded image, or to the padded canvas when
        ``boxes_relative_to_canvas``) -> xyxy input pixels."""
        if self.boxes_relative_to_canvas:
            hw = pred_boxes.new_tensor(pixel_mask.shape[-2:]).expand(pixel_mask.shape[0], 2)
        else:
            hw = input_hw_from_mask(pixel_mask).to(pred_boxes.dtype)
        scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1)
        return _cxcywh_to_xyxy(pred_boxes) * scale[:, None, :]

    def _run_model(self, pixel_values: Tensor, pixel_mask: Tensor) -> Any:
        """The wrapped model's raw output on one batch (families with more inputs override it)."""
        return self.model(pixel_values=pixel_values, pixel_mask=pixel_mask.to(torch.long))

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        self._stash.clear()
        try:
            with torch.no_grad():
                return self._collect(self._run_model(pixel_values, pixel_mask), pixel_values, pixel_mask)
        finally:
            self._stash.clear()
