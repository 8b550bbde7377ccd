"""Frozen detectors, named by a spec string: ``hf:<local dir or hub id>`` or ``demo``.

This module stays light (no transformers import) because :mod:`mfcache.detectors.base`
is imported by code that never runs a detector; the adapters load on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from mfcache.detectors.base import RESIZE_PATHS, Detector
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
    "hf": _load_hf,
    "demo": _load_demo,
    "hdetr": _native_loader("hdetr"),
    "dino": _native_loader("dino"),
}


def load_detector(
    spec: str, *, device: str | torch.device = "cpu", resize: str | None = None, prompts: Sequence[str] | None = None
) -> Detector:
    """Build the frozen detector named by ``spec``: eval mode, no grads, on ``device``.

    ``resize`` picks the pixel path (:class:`~mfcache.detectors.base.Preprocess` ``.resize``:
    ``processor`` or ``float``); None keeps the detector's own (``processor`` for ``hf:``,
    ``float`` for ``demo``, whose weights were trained on it). ``prompts``: the phrases of an
    open-vocabulary detector (:meth:`~mfcache.detectors.base.Detector.set_prompts`; without
    them it runs only once they are set)."""
    if resize is not None and resize not in RESIZE_PATHS:
        raise MfcacheError(f"resize must be {' or '.join(RESIZE_PATHS)}, got {resize!r}")
    prefix, _, arg = spec.partition(":")
    loader = LOADERS.get(prefix.strip())
    if loader is None:
        raise MfcacheError(f"unknown detector spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
    detector = loader(arg.strip())
    if resize is not None:
        detector.info = replace(detector.info, preprocess=replace(detector.info.preprocess, resize=resize))
    detector.eval()
    detector.requires_grad_(False)
    detector = detector.to(device)
    if prompts:
        detector.set_prompts(prompts)
    return detector


__all__ = ["Detector", "LOADERS", "SPEC_FORMS", "load_detector"]


def run_detector(model: Detector, inputs: list[torch.Tensor], *, device: torch.device, amp: str = "off"):
    """The detector on a batch of preprocessed images (``[3, h_i, w_i]`` each, padded here as
    its processor pads) with mixed precision ``amp`` (``off``, ``bf16`` or ``fp16``); the
    :class:`~mfcache.detectors.base.DetectorOutput` comes back in float32 whatever ``amp``."""
    from mfcache.data.transforms import pad_batch
    from mfcache.runtime import autocast

    pixel_values, pixel_mask = pad_batch(inputs, model.info.preprocess)
    with autocast(device, amp):
        out = model(pixel_values.to(device), pixel_mask.to(device))
    return out.float()
