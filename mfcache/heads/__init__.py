"""Mask heads, built from a :class:`~mfcache.config.HeadConfig`."""

from __future__ import annotations

from mfcache.config import HeadConfig
from mfcache.errors import MfcacheError
from mfcache.heads.base import HeadOutput, MaskHead
from mfcache.heads.box import BoxDotHead

__all__ = ["HeadOutput", "MaskHead", "build_head"]


def build_head(config: HeadConfig, *, d_model: int, c1_channels: int, num_levels: int) -> MaskHead:
    """The head ``config`` describes, sized for a cache's detector (c1_channels 0 = no C1 cached)."""
    if config.region != "box":
        raise MfcacheError(f"head.region {config.region!r} is not available; valid: box")
    if config.roi_size not in (16, 32, 64):
        raise MfcacheError(f"head.roi_size must be 16, 32 or 64, got {config.roi_size}")
    if not 0 <= config.level < num_levels:
        raise MfcacheError(f"head.level {config.level} is out of range: the cache has {num_levels} levels")
    if config.use_c1 and not c1_channels:
        raise MfcacheError("head.use_c1 = true but the cache holds no C1 map (extracted with --c1 none); "
                           "use --set head.use_c1=false")
    if config.scoring not in ("class", "mask_prob"):
        raise MfcacheError(f"head.scoring must be class or mask_prob, got {config.scoring!r}")
    return BoxDotHead(d_model=d_model, c1_channels=c1_channels, channels=config.channels or d_model,
                      roi_size=config.roi_size, level=config.level, use_c1=config.use_c1)
