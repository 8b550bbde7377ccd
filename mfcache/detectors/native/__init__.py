"""Native H-DETR and DINO-DETR detectors that load the original repos' checkpoints.

``load_native("hdetr", "<file.pth>?options")`` / ``load_native("dino", ...)``; the spec
grammar and options are documented in :mod:`mfcache.detectors.native.checkpoint`.
Backbones: ResNet (R50 default) and Swin (``backbone=swin_large``); C1 is the first stage's
output at stride 4 (ResNet ``layer1``, 256 channels for R50; Swin stage 0 before any norm,
192 channels for Swin-L).
"""

from __future__ import annotations

import dataclasses

from mfcache.detectors.base import DetectorInfo, Preprocess
from mfcache.detectors.native.checkpoint import (build_config, load_weights, parse_spec,
                                                 read_labels, read_state_dict)
from mfcache.detectors.native.coco_labels import COCO91_LABELS
from mfcache.detectors.native.detector import NativeDetector
from mfcache.detectors.native.dino import Dino, DinoConfig
from mfcache.detectors.native.hdetr import HDetr, HDetrConfig
from mfcache.errors import MfcacheError
from mfcache.hashing import file_sha256

FAMILIES = {"hdetr": (HDetrConfig, HDetr), "dino": (DinoConfig, Dino)}


def _label_names(cfg, extra: dict[str, str], where: str):
    """(config with num_classes set, label names)."""
    if "labels" in extra:
        names = read_labels(extra["labels"], where)
        return dataclasses.replace(cfg, num_classes=len(names)), names
    if cfg.num_classes == len(COCO91_LABELS):
        return cfg, COCO91_LABELS
    return cfg, tuple(f"class_{i}" for i in range(cfg.num_classes))


def load_native(family: str, arg: str) -> NativeDetector:
    """Build ``family`` ("hdetr" | "dino") from the spec argument ``<file>[?options]``."""
    spec = f"{family}:{arg}"
    cfg_cls, model_cls = FAMILIES[family]
    path, options = parse_spec(arg, family)
    cfg, extra = build_config(cfg_cls, options, spec)
    cfg, names = _label_names(cfg, extra, spec)
    state = read_state_dict(path)
    label_enc = state.get("label_enc.weight")
    if family == "dino" and "dn_labelbook_size" not in options and label_enc is not None:
        # the denoising label table is training-only; take its size from the checkpoint
        cfg = dataclasses.replace(cfg, dn_labelbook_size=int(label_enc.shape[0]) - 1)
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
        spec=spec, family=family, d_model=cfg.d_model, num_queries=cfg.num_queries, label_names=names,
        strides=model.strides, c1_channels=model.c1_channels, sigmoid=True, weights_sha256=file_sha256(path),
        # the original repos resize PIL images (PIL's uint8 kernel), which neither mfcache path
        # reproduces bit for bit; native caches stay on the float path they were made with
        preprocess=Preprocess(shortest_edge=shortest, longest_edge=longest, pad_divisor=model.strides[-1],
                              resize="float"),
    )
    return model


__all__ = ["COCO91_LABELS", "FAMILIES", "Dino", "DinoConfig", "HDetr", "HDetrConfig", "load_native"]
