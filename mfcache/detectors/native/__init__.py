"""Native H-DETR and DINO-DETR detectors that load the original repos' checkpoints.

``load_native("hdetr", "<file.pth>?options")`` / ``load_native("dino", ...)``; the spec
grammar and options are documented in :mod:`mfcache.detectors.native.checkpoint`.
The architecture is read from the checkpoint's tensors where they fix it
(:mod:`~mfcache.detectors.native.architecture`: backbone, Swin window, levels, queries, ...).
Backbones: ResNet 18/34/50/101 (DC5 with ``dilation=1``) and Swin tiny/small/base/large, window
7 or 12 as the checkpoint has it; C1 is the first stage's
output at stride 4 (ResNet ``layer1``, 256 channels for R50; Swin stage 0 before any norm,
192 channels for Swin-L).
"""

from __future__ import annotations

from mfcache.detectors.base import DetectorInfo, Preprocess
from mfcache.detectors.native.architecture import resolve_options
from mfcache.detectors.native.checkpoint import (
    load_weights,
    parse_options,
    parse_spec,
    read_labels,
    read_state_dict,
    rename_keys,
)
from mfcache.detectors.native.coco_labels import COCO91_LABELS
from mfcache.detectors.native.detector import NativeDetector
from mfcache.detectors.native.dino import Dino, DinoConfig
from mfcache.detectors.native.hdetr import HDetr, HDetrConfig
from mfcache.errors import MfcacheError
from mfcache.hashing import file_sha256

FAMILIES = {"hdetr": (HDetrConfig, HDetr), "dino": (DinoConfig, Dino)}


def _labels(values: dict, extra: dict[str, str], where: str) -> tuple[dict, tuple[str, ...] | None, dict]:
    """(options with num_classes set by a labels file, its names or None, how num_classes was given)."""
    if "labels" not in extra:
        return values, None, {}
    names = read_labels(extra["labels"], where)
    if values.get("num_classes", len(names)) != len(names):
        raise MfcacheError(f"{where}: num_classes={values['num_classes']} but the labels file names {len(names)}")
    given = {"num_classes": f"labels={extra['labels']} ({len(names)} names)"}
    return {**values, "num_classes": len(names)}, names, given


def _default_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == len(COCO91_LABELS):
        return COCO91_LABELS
    return tuple(f"class_{i}" for i in range(num_classes))


def load_native(family: str, arg: str) -> NativeDetector:
    """Build ``family`` ("hdetr" | "dino") from the spec argument ``<file>[?options]``: the
    architecture is read from the checkpoint's tensors where they fix it, the spec's options
    fill in the rest (and must agree with the tensors)."""
    spec = f"{family}:{arg}"
    cfg_cls, model_cls = FAMILIES[family]
    path, options = parse_spec(arg, family)
    values, extra = parse_options(cfg_cls, options, spec)
    values, names, given_as = _labels(values, extra, spec)
    state = read_state_dict(path)
    values = resolve_options(family, values, rename_keys(state), spec, given_as)
    cfg = cfg_cls(**values)
    names = names or _default_names(cfg.num_classes)
    try:
        model = model_cls(cfg)
    except ValueError as exc:
        raise MfcacheError(f"{spec}: {exc}") from None
    load_weights(model, state, str(path), family)
    default = Preprocess()
    try:
        shortest = int(extra.get("shortest_edge", default.shortest_edge))
        longest = int(extra.get("longest_edge", default.longest_edge))
    except ValueError:
        raise MfcacheError(f"{spec}: shortest_edge / longest_edge must be integers") from None
    model.info = DetectorInfo(
        spec=spec,
        family=family,
        d_model=cfg.d_model,
        num_queries=cfg.num_queries,
        label_names=names,
        strides=model.strides,
        c1_channels=model.c1_channels,
        sigmoid=True,
        weights_sha256=file_sha256(path),
        # the original repos resize PIL images (PIL's uint8 kernel), which neither mfcache path
        # reproduces bit for bit; native caches stay on the float path they were made with
        preprocess=Preprocess(
            shortest_edge=shortest, longest_edge=longest, pad_divisor=model.strides[-1], resize="float"
        ),
    )
    return model


__all__ = ["COCO91_LABELS", "FAMILIES", "Dino", "DinoConfig", "HDetr", "HDetrConfig", "load_native"]
