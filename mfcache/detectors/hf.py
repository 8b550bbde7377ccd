"""Adapters for transformers' DETR-family detectors (``hf:<local dir or hub id>``).

:class:`HFDetector` holds what every family shares: freezing, the hooks (registered once,
their results stashed per forward), the C1 map, box conversion and the fingerprint.
A family is a small subclass that names its transformers class and says where its
queries, memory and level shapes are (:class:`HFDeformableDetr`); :data:`ADAPTERS` maps
``config.json``'s ``model_type`` to it.

Boxes. Deformable DETR predicts ``pred_boxes`` as cxcywh normalised to each image's
*unpadded* extent: the decoder multiplies its reference points by the per-level
``valid_ratios`` before sampling the padded memory, the original training code
normalised targets by the unpadded size, and ``post_process_object_detection`` scales
by the image size. So the adapter multiplies by each image's valid input (w, h), read
from ``pixel_mask`` (padding is bottom/right, as every DETR processor does).
(transformers' own image processor, when padding *training* annotations, rescales
boxes to the padded canvas; a checkpoint fine-tuned that way on padded batches is
inconsistent with its own post-processing. We follow the architecture.)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mfcache.detectors.base import Detector, DetectorInfo, DetectorOutput, Preprocess, state_dict_sha256
from mfcache.errors import MfcacheError

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


class HFDetector(Detector):
    """A frozen transformers detector. Subclasses set the class attributes and implement
    :meth:`_hook_points` (where to listen) and :meth:`_collect` (raw output -> DetectorOutput).
    """

    family: ClassVar[str]
    model_class: ClassVar[str]  # name of the transformers class, imported lazily
    sigmoid: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, spec: str, preprocess: Preprocess, weights_sha256: str,
                 trained: bool = True):
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
        if preprocess.pad_divisor % strides[-1]:
            # padding to a multiple of the coarsest stride is what makes valid == level_shapes
            preprocess = replace(preprocess, pad_divisor=strides[-1])
        config = model.config
        self.info = DetectorInfo(
            spec=spec,
            family=self.family,
            d_model=int(config.d_model),
            num_queries=self._num_queries(),
            label_names=tuple(str(config.id2label[i]) for i in range(int(config.num_labels))),
            strides=tuple(int(s) for s in strides),
            c1_channels=int(c1_channels),
            sigmoid=self.sigmoid,
            weights_sha256=weights_sha256,
            preprocess=preprocess,
            trained=trained,
        )

    # ----------------------------------------------------------------- for subclasses
    def _install_hooks(self) -> None:
        """Register the family's own hooks (append handles to ``self._handles``)."""

    def _num_queries(self) -> int:
        return int(self.model.config.num_queries)

    def _backbone(self) -> nn.Module:
        """The backbone network itself (HF ``ResNetBackbone`` or an unwrapped timm model)."""
        raise NotImplementedError

    def _backbone_features(self, pixel_values: Tensor, pixel_mask: Tensor) -> list[Tensor]:
        """Backbone feature maps that feed the encoder (used only to probe strides)."""
        raise NotImplementedError

    def _num_levels(self) -> int:
        raise NotImplementedError

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        raise NotImplementedError

    # ----------------------------------------------------------------- shared machinery
    def _find_c1_module(self) -> nn.Module | None:
        """The backbone's first stage, whose output is the stride-4 map."""
        backbone = self._backbone()
        encoder = getattr(backbone, "encoder", None)
        stages = getattr(encoder, "stages", None)
        if stages is not None and len(stages) > 0:  # transformers ResNet / ConvNeXt / ... backbones
            return stages[0]
        if hasattr(backbone, "layer1"):  # timm ResNet (FeatureListNet keeps the names)
            return backbone.layer1
        return None

    def _c1_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._stash["c1"] = output[0] if isinstance(output, (tuple, list)) else output

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
        num_levels = self._num_levels()
        strides = strides[:num_levels]
        while len(strides) < num_levels:  # extra levels: 3x3 stride-2 convs on the last map
            strides.append(strides[-1] * 2)
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
        """Normalised cxcywh (relative to each unpadded image) -> xyxy input pixels."""
        hw = input_hw_from_mask(pixel_mask).to(pred_boxes.dtype)
        scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1)
        return _cxcywh_to_xyxy(pred_boxes) * scale[:, None, :]

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        self._stash.clear()
        try:
            with torch.no_grad():
                raw = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask.to(torch.long))
                return self._collect(raw, pixel_values, pixel_mask)
        finally:
            self._stash.clear()


class HFDeformableDetr(HFDetector):
    """Deformable DETR (plain, with_box_refine, two_stage)."""

    family = "deformable_detr"
    model_class = "DeformableDetrForObjectDetection"

    def _backbone(self) -> nn.Module:
        return self.model.model.backbone.model

    def _backbone_features(self, pixel_values: Tensor, pixel_mask: Tensor) -> list[Tensor]:
        return [f for f, _ in self.model.model.backbone(pixel_values, pixel_mask)]

    def _num_levels(self) -> int:
        return int(self.model.config.num_feature_levels)

    def _num_queries(self) -> int:
        config = self.model.config
        return int(config.two_stage_num_proposals if config.two_stage else config.num_queries)

    def _install_hooks(self) -> None:
        self._handles.append(
            self.model.model.encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True))

    def _encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        shapes = kwargs.get("spatial_shapes_list")
        if shapes is None:
            shapes = [tuple(s) for s in kwargs["spatial_shapes"].tolist()]
        self._stash["spatial_shapes"] = [(int(h), int(w)) for h, w in shapes]
        self._stash["level_mask"] = kwargs["attention_mask"]  # [B, sum(h*w)], True = real

    def _valid(self) -> Tensor:
        """[B, L, 2] real (h, w) of each level, counted on the masks the model built."""
        mask = self._stash["level_mask"].bool()
        out, start = [], 0
        for h, w in self._stash["spatial_shapes"]:
            m = mask[:, start:start + h * w].view(-1, h, w)
            out.append(torch.stack([m[:, :, 0].sum(1), m[:, 0, :].sum(1)], dim=1))
            start += h * w
        return torch.stack(out, dim=1)

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        memory = raw.encoder_last_hidden_state
        return DetectorOutput(
            queries=raw.last_hidden_state,
            logits=raw.logits,
            boxes=self.boxes_to_input_pixels(raw.pred_boxes, pixel_mask),
            memory=memory,
            spatial_shapes=torch.as_tensor(self._stash["spatial_shapes"], dtype=torch.long, device=memory.device),
            valid=self._valid(),
            c1=self._stash.get("c1"),
        )


ADAPTERS: dict[str, type[HFDetector]] = {"deformable_detr": HFDeformableDetr}


# --------------------------------------------------------------------------- loading
def _looks_like_path(path: str) -> bool:
    return (path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1
            or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path))


def _resolve(path: str, filename: str, *, required: bool) -> Path | None:
    """Local path of ``filename`` in a model directory or (network permitting) a hub repo."""
    local = Path(path).expanduser()
    if local.is_dir():
        found = local / filename
        if found.is_file():
            return found
        if required:
            raise MfcacheError(f"{path}: no {filename} (not a saved transformers model directory)")
        return None
    if local.exists():
        raise MfcacheError(f"{path} is a file; expected a transformers model directory")
    if _looks_like_path(path):
        raise MfcacheError(f"model directory not found: {path}")
    from transformers.utils import cached_file

    try:
        if required:  # let the hub say why (offline, no such repo, gated, ...)
            found = cached_file(path, filename)
        else:
            found = cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's to fix
        raise MfcacheError(f"cannot load {path!r}: no such local directory, and the hub could not "
                           f"provide {filename} ({type(exc).__name__}: {_first_line(exc)})") from None
    if found is None and required:
        raise MfcacheError(f"{path!r}: the hub repo has no {filename}")
    return Path(found) if found is not None else None


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_preprocess(path: Path | None) -> Preprocess:
    """Preprocess from a ``preprocessor_config.json`` (None -> DETR defaults)."""
    if path is None:
        return Preprocess()
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MfcacheError(f"cannot read {path}: {exc}") from None
    default = Preprocess()
    size = cfg.get("size")
    if size is None:
        shortest, longest = default.shortest_edge, default.longest_edge
    elif isinstance(size, int):
        shortest, longest = size, int(cfg.get("max_size") or default.longest_edge)
    elif isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
        longest = int(size.get("longest_edge") or cfg.get("max_size") or default.longest_edge)
    else:
        raise MfcacheError(f"{path}: resize rule {size!r} is not supported; mfcache resizes by "
                           "shortest_edge/longest_edge")
    if cfg.get("do_normalize", True):
        mean = tuple(float(v) for v in cfg.get("image_mean", default.mean))
        std = tuple(float(v) for v in cfg.get("image_std", default.std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocess(shortest_edge=shortest, longest_edge=longest, mean=mean, std=std)


def load_hf(path: str, spec: str | None = None, *, preprocess: Preprocess | None = None,
            trained: bool = True) -> Detector:
    """Load a saved transformers detector (a local directory; a hub id needs network).

    The adapter is chosen by ``config.json``'s ``model_type``; ``preprocess`` overrides
    the one read from ``preprocessor_config.json`` (else DETR defaults).
    """
    spec = spec or f"hf:{path}"
    config_path = _resolve(path, "config.json", required=True)
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise MfcacheError(f"cannot read {config_path}: {exc}") from None
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise MfcacheError(f"{path}: model_type {model_type!r} is not supported; "
                           f"supported: {', '.join(sorted(ADAPTERS))}")
    import transformers

    model_cls = getattr(transformers, adapter.model_class)
    source = str(Path(path).expanduser()) if Path(path).expanduser().is_dir() else path
    try:
        model, loading = model_cls.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    except ImportError as exc:  # e.g. a timm backbone without timm installed
        raise MfcacheError(f"{path}: cannot build the model: {_first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise MfcacheError(f"{path}: cannot load the model: {_first_line(exc)}") from None
    if loading.get("missing_keys"):
        missing = sorted(loading["missing_keys"])
        raise MfcacheError(f"{path}: checkpoint lacks {len(missing)} weights the model needs "
                           f"(e.g. {missing[0]}); refusing to run a partly random detector")
    if preprocess is None:
        preprocess = read_preprocess(_resolve(path, "preprocessor_config.json", required=False))
    weights = _resolve(path, "model.safetensors", required=False)
    sha = _file_sha256(weights) if weights is not None else state_dict_sha256(model)
    return adapter(model, spec=spec, preprocess=preprocess, weights_sha256=sha, trained=trained)
