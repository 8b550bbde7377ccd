"""Frozen detectors, named by a spec string: ``hf:<local dir or hub id>`` or ``demo``.

This module stays light (no transformers import) because :mod:`mfcache.detectors.base`
is imported by code that never runs a detector; the adapters load on first use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mfcache.detectors.base import Detector
from mfcache.errors import MfcacheError

SPEC_FORMS = ("hf:<local dir or hub id>", "demo", "hdetr:<file.pth>[?options]", "dino:<file.pth>[?options]")


def _load_hf(arg: str) -> Detector:
    if not arg:
        raise MfcacheError("detector spec 'hf:' needs a path or hub id, e.g. hf:./my-deformable-detr")
    from mfcache.detectors.hf import load_hf

    return load_hf(arg, spec=f"hf:{arg}")


def _load_demo(arg: str) -> Detector:
    if arg:
        raise MfcacheError(f"detector spec 'demo' takes no argument (got 'demo:{arg}')")
    from mfcache.detectors.demo import load_demo

    return load_demo()


def _native_loader(family: str) -> Callable[[str], Detector]:
    """Loader of an original-repo checkpoint (options: mfcache.detectors.native.checkpoint)."""

    def load(arg: str) -> Detector:
        from mfcache.detectors.native import load_native

        return load_native(family, arg)

    return load


LOADERS: dict[str, Callable[[str], Detector]] = {
    "hf": _load_hf, "demo": _load_demo, "hdetr": _native_loader("hdetr"), "dino": _native_loader("dino"),
}


def load_detector(spec: str, *, device: str | torch.device = "cpu") -> Detector:
    """Build the frozen detector named by ``spec``: eval mode, no grads, on ``device``."""
    prefix, _, arg = spec.partition(":")
    loader = LOADERS.get(prefix.strip())
    if loader is None:
        raise MfcacheError(f"unknown detector spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
    detector = loader(arg.strip())
    detector.eval()
    detector.requires_grad_(False)
    return detector.to(device)


__all__ = ["Detector", "LOADERS", "SPEC_FORMS", "load_detector"]
