"""Mask heads, composed from parts by :func:`build_head` from a :class:`~mfcache.config.HeadConfig`
(the only place that reads the config; parts take keyword-only typed arguments)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mfcache.config import HeadConfig, check_config
from mfcache.errors import MfcacheError
from mfcache.heads.base import HeadOutput, MaskHead
from mfcache.heads.blender import BlenderPredictor
from mfcache.heads.box_encoder import BoxEncoder
from mfcache.heads.composed import ComposedHead
from mfcache.heads.convnext import ConvNeXtEncoder
from mfcache.heads.deformable import DeformableEncoder
from mfcache.heads.dot import DotPredictor, ImageDotPredictor
from mfcache.heads.fcn import FCNPredictor
from mfcache.heads.fusion import FusedMap, conv_gn, fused_norm
from mfcache.heads.query_encoder import QueryEncoder
from mfcache.heads.region import FUSED_STRIDE
from mfcache.heads.scoring import MaskIoUHead
from mfcache.heads.swin import SwinEncoder

__all__ = ["HeadOutput", "MaskHead", "build_head", "check_head_config"]

ATTENTION_HEADS = 4


def check_head_config(c: HeadConfig, *, channels: int, c1_channels: int, num_levels: int) -> None:
    """Raise :class:`MfcacheError` naming the options of ``c`` that are out of range (each
    field's allowed values, :data:`~mfcache.config.HEAD_CHOICES` among them, are declared on
    :class:`~mfcache.config.HeadConfig`; this module builds exactly those choices), else the
    first combination that cannot be built for this cache."""
    check_config(c)
    if not 0 <= c.level < num_levels:
        raise MfcacheError(f"head.level {c.level} is out of range: the cache has {num_levels} levels")
    if c.use_c1 and not c1_channels:
        raise MfcacheError(
            "head.use_c1 = true but the cache holds no C1 map (extracted with `extract.c1` none, or a "
            "detector without a stride-4 map: ViT backbones); use `head.use_c1=false`"
        )
    if c.neck != "none" and not c.use_c1:
        raise MfcacheError(f"head.neck = {c.neck!r} needs head.use_c1 = true (the neck maps C1)")
    if (
        "box_cross_attn" in c.query_encoder
        and "self_attn" in c.query_encoder[c.query_encoder.index("box_cross_attn") :]
    ):
        raise MfcacheError(
            "head.query_encoder: self_attn must come before box_cross_attn "
            "(it runs on all K queries of an image, before selection)"
        )
    attention = c.box_encoder_depth > 0 or c.query_encoder or c.encoder in ("deformable", "swin")
    if attention and channels % ATTENTION_HEADS:
        raise MfcacheError(f"head.channels ({channels}) must be divisible by {ATTENTION_HEADS} for attention layers")
    if c.region == "image" and (c.predictor != "dot" or c.box_encoder_depth or "box_cross_attn" in c.query_encoder):
        raise MfcacheError(
            "head.region = 'image' works with predictor = 'dot' and no box-level parts "
            "(box_encoder_depth = 0, no box_cross_attn)"
        )
    if c.predictor == "fcn" and c.query_encoder:
        raise MfcacheError("head.predictor = 'fcn' ignores the queries: set head.query_encoder = []")


def query_projection(d_model: int, channels: int, init: str) -> nn.Linear:
    """The queries' linear map d -> d', initialised as ``head.query_init`` says."""
    proj = nn.Linear(d_model, channels)
    with torch.no_grad():
        if init == "zero":
            proj.weight.zero_()
            proj.bias.zero_()
        elif init == "small":
            proj.weight.mul_(0.1)
    return proj


# Registries: plain dicts of builders, as the detectors' ``LOADERS`` (one style for both). Each
# builder takes the head's config and the sizes it needs, keyword-only.
def _no_encoder(c: HeadConfig, *, d_model: int, num_levels: int) -> None:
    return None


def _deformable_encoder(c: HeadConfig, *, d_model: int, num_levels: int) -> nn.Module:
    return DeformableEncoder(dim=d_model, num_levels=num_levels, depth=c.encoder_depth, activation=c.encoder_activation)


def _swin_encoder(c: HeadConfig, *, d_model: int, num_levels: int) -> nn.Module:
    return SwinEncoder(dim=d_model, depth=c.encoder_depth)


def _convnext_encoder(c: HeadConfig, *, d_model: int, num_levels: int) -> nn.Module:
    return ConvNeXtEncoder(dim=d_model, depth=c.encoder_depth)


ENCODERS: dict[str, Callable[..., nn.Module | None]] = {
    "none": _no_encoder,
    "deformable": _deformable_encoder,
    "swin": _swin_encoder,
    "convnext": _convnext_encoder,
}


def _dot_predictor(c: HeadConfig, *, channels: int) -> nn.Module:
    return DotPredictor(channels=channels, roi_size=c.roi_size, affine=c.dot_logit == "affine")


def _blender_predictor(c: HeadConfig, *, channels: int) -> nn.Module:
    return BlenderPredictor(
        channels=channels, bases=c.blender_bases, attn_size=c.blender_attn_size, roi_size=c.roi_size
    )


def _fcn_predictor(c: HeadConfig, *, channels: int) -> nn.Module:
    return FCNPredictor(channels=channels, hidden=min(channels, 128))


PREDICTORS: dict[str, Callable[..., nn.Module]] = {
    "dot": _dot_predictor,
    "blender": _blender_predictor,
    "fcn": _fcn_predictor,
}


def build_head(
    config: HeadConfig, *, d_model: int, c1_channels: int, num_levels: int, strides: Sequence[int] | None = None
) -> MaskHead:
    """The head ``config`` describes, sized for a cache's detector (c1_channels 0 = no C1 cached;
    ``strides``: each level's stride, by default 8 * 2^l, Deformable DETR's)."""
    c = config
    strides = tuple(strides) if strides is not None else tuple(8 * 2**level for level in range(num_levels))
    channels = c.channels or d_model
    check_head_config(c, channels=channels, c1_channels=c1_channels, num_levels=num_levels)
    multi_scale = c.encoder == "deformable"
    levels = tuple(range(num_levels)) if multi_scale else (c.level,)
    encoder = ENCODERS[c.encoder](c, d_model=d_model, num_levels=num_levels)
    if not c.use_c1:
        neck = None
    elif c.neck == "conv_gn":
        neck = conv_gn(c1_channels, channels)
    else:
        neck = nn.Conv2d(c1_channels, channels, 1) if c1_channels != channels else nn.Identity()
    fusion = FusedMap(
        encoder=encoder,
        multi_scale=multi_scale,
        index=levels.index(c.level),
        upsample=strides[c.level] / FUSED_STRIDE,  # F has stride 4 (LW/RF-DETR: 14 / 4 = 3.5)
        mapper=nn.Conv2d(d_model, channels, 1) if channels != d_model else nn.Identity(),
        neck=neck,
        norm=fused_norm(c.fused_norm, channels),
    )
    feature_size = c.roi_size // 2 if c.predictor == "fcn" else c.roi_size
    if c.region == "image":
        predictor: nn.Module = ImageDotPredictor(channels=channels, roi_size=c.roi_size, affine=c.dot_logit == "affine")
    else:
        predictor = PREDICTORS[c.predictor](c, channels=channels)
    query_proj = None if c.predictor == "fcn" else query_projection(d_model, channels, c.query_init)
    return ComposedHead(
        levels=levels,
        uses_c1=c.use_c1,
        roi_size=c.roi_size,
        feature_size=feature_size,
        fusion=fusion,
        query_proj=query_proj,
        query_encoder=QueryEncoder(dim=channels, kinds=c.query_encoder),
        box_encoder=BoxEncoder(dim=channels, depth=c.box_encoder_depth, query_token=c.box_encoder_query)
        if c.box_encoder_depth
        else None,
        predictor=predictor,
        scorer=MaskIoUHead(channels=channels, readout=c.quality_head) if c.scoring == "mask_iou" else None,
        needs_roi_features=c.region == "box" and c.predictor == "fcn",
        channels=channels,
    )
