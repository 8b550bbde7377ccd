"""The Python API: a trained run as a predictor you call on images.

In the style of detectron2's ``DefaultPredictor``, mmdet's ``DetInferencer`` and the
transformers pipelines: the frozen detector and the trained head load once, then each call
runs the detector and the head on one image or a list::

    from mfcache.api import Predictor

    predictor = Predictor("mfcache-demo/run")   # the detector the run's cache was made with
    result = predictor("photo.jpg")             # -> Instances
    masks, boxes = result.masks, result.boxes   # [N, H, W] bool, [N, 4] xyxy in the photo's pixels
    results = predictor([pil_image, array])     # a list in, a list out

Images: a path, a PIL image, a numpy ``[H, W, C]`` array (RGB, channels last) or a tensor
``[C, H, W]`` (channels first), ``uint8`` or float in [0, 1]; a list of them, or a 4-D
array/tensor as a batch (:func:`mfcache.data.transforms.to_image`).

Results are :class:`~mfcache.stages.postprocess.Instances`, made by the same code as
``mfcache predict`` (:func:`mfcache.stages.predict.segment`), so ``result.to_coco(image_id)``
equals what ``predict`` writes to results.json for that image. Like the CLI, a run or
detector checkpoint is loaded without running code from it unless ``trust_checkpoint=True``
(:mod:`mfcache.checkpoint_io`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mfcache.checkpoint_io import trusting
from mfcache.data.transforms import to_image
from mfcache.errors import MfcacheError
from mfcache.stages.postprocess import Instances
from mfcache.stages.predict import load_segmenter, segment

__all__ = ["Instances", "Predictor"]


class Predictor:
    """A trained run (``run``: its folder, written by ``mfcache train``) and the frozen detector
    it was trained on, loaded once.

    ``detector``: a detector spec (``demo``, ``hf:<dir>``, ...); None takes the one the run's
    cache was extracted with, as recorded there (a relative path is relative to where
    ``extract`` ran: name it again here if it moved). It must be that detector (weights and
    preprocessing), or loading fails with the difference. ``device``: ``auto`` (a GPU if
    there is one), ``cpu``, ``cuda`` or ``cuda:N``. ``score_threshold``: detections scoring
    below it are dropped before their masks are pasted (0 keeps all, as ``predict``'s
    results.json does; at most ``eval.max_detections`` per image either way). ``batch_size``:
    images per detector batch when called on a list. ``trust_checkpoint``: load checkpoints
    with the full unpickler (the CLI's ``--trust-checkpoint``): only for files from a source
    you trust, as such a file can run any code.
    """

    def __init__(
        self,
        run: str | Path,
        *,
        detector: str | None = None,
        device: str = "auto",
        score_threshold: float = 0.0,
        batch_size: int = 1,
        trust_checkpoint: bool = False,
    ):
        _check_threshold(score_threshold)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MfcacheError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.run = Path(run)
        self.score_threshold, self.batch_size = score_threshold, batch_size
        with trusting(trust_checkpoint):  # the detector's checkpoint and the run's are read here only
            self._segmenter = load_segmenter(self.run, detector=detector, device=device)

    @property
    def detector(self) -> str:
        """The spec of the loaded detector."""
        return self._segmenter.model.info.spec

    @property
    def device(self) -> torch.device:
        return self._segmenter.device

    @property
    def category_names(self) -> dict[int, str]:
        """{dataset category id: name}: the categories ``labels`` refer to."""
        return dict(self._segmenter.category_names)

    def __repr__(self) -> str:
        head = self._segmenter.run.config.head.name
        return f"Predictor(run={str(self.run)!r}, detector={self.detector!r}, head={head!r}, device='{self.device}')"

    def __call__(self, images, *, score_threshold: float | None = None) -> Instances | list[Instances]:
        """Segment ``images``: one image -> :class:`Instances`; a list (or tuple, or a 4-D
        array/tensor) -> a list of them, in order. ``score_threshold`` overrides the
        predictor's for this call. An image's results do not depend on its batch mates
        (beyond the detector's last floating-point bits, as for ``predict --batch-size``)."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        _check_threshold(threshold)
        single = not _is_batch(images)
        items = [images] if single else list(images)
        found: list[Instances] = []
        for start in range(0, len(items), self.batch_size):  # decoded chunk by chunk: a long list fits in memory
            pixels = {i: to_image(x) for i, x in enumerate(items[start : start + self.batch_size], start=start + 1)}
            found += segment(self._segmenter, pixels, min_score=threshold)
        return found[0] if single else found


def _is_batch(images) -> bool:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim == 4
    return isinstance(images, Sequence) and not isinstance(images, (str, bytes, bytearray))


def _check_threshold(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise MfcacheError(f"score_threshold must be in [0, 1], got {value!r}")
