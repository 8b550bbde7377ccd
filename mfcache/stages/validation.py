"""Periodic validation while training (``train.eval_every``): segm AP of the head on the cache's
val split, and the best head so far kept as ``best.pt``.

Each validation is the computation ``mfcache eval`` makes on that step's checkpoint
(:func:`~mfcache.stages.evaluate.predict_split`, the run's ``eval`` settings, the split's
finished images), scored for segm only: ``eval --checkpoint best`` on ``best.pt`` reports the
AP recorded here. It runs on rank 0 alone, in eval mode and without gradients, inside
:func:`torch.random.fork_rng`: the training's random streams (point sampling, the data
loader's seed draws) are those of a run that never validated, so a run with validation ends
with the weights of one without, and an interrupted run resumes exactly.
"""

from __future__ import annotations

import torch

from mfcache.cache.reader import Cache, CacheSplit
from mfcache.config import RunConfig
from mfcache.heads import MaskHead
from mfcache.metrics import coco_evaluate
from mfcache.stages.evaluate import predict_split


class PeriodicValidation:
    """Segm AP on ``data`` (a complete eval split) every ``every`` steps and at the last step;
    ``best`` is the record of the best so far (``{"step", "segm_AP", "split"}``, None before
    the first), restored from a resumed checkpoint."""

    def __init__(self, data: CacheSplit, every: int, best: dict | None = None):
        self.data, self.every, self.best = data, every, best
        self._coco = None  # the GT, parsed at the first validation (rank 0 alone validates)
        self.image_ids = data.index["image_id"][
            data.complete_rows
        ].tolist()  # images skipped at extraction are not scored

    @classmethod
    def open(cls, cache: Cache, every: int, best: dict | None) -> PeriodicValidation | None:
        """The cache's default eval split (``val*``/``test*``) for ``every`` > 0; None for 0.
        A cache without one, or an incomplete one, is an error before training starts."""
        if every <= 0:
            return None
        data = cache.split(None, role="eval")
        data.require_complete()
        return cls(data, every, best)

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def __call__(self, head: MaskHead, config: RunConfig, device: torch.device, step: int) -> dict:
        """``{"split", "segm": {"AP", "AP50", ...}}`` of ``head`` at ``step`` (fractions; None
        where pycocotools has no GT of that size), with ``"best": True`` when it beats the best
        so far, which it then becomes. The head is left in the mode it was in."""
        was_training = head.training
        head.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                results = predict_split(head, config, self.data, device, progress=False)
        finally:
            head.train(was_training)
        if self._coco is None:  # parsed once: pycocotools' COCOeval leaves the GT reusable (detectron2 reuses it)
            self._coco = self.data.coco()
        segm = coco_evaluate(self._coco, results["head"], iou_types=("segm",), image_ids=self.image_ids)["segm"]
        record = {"split": self.data.name, "segm": segm}
        ap = -1.0 if segm["AP"] is None else segm["AP"]  # None: the split has no GT instance to find
        if self.best is None or ap > self.best["segm_AP"]:
            self.best = {"step": step, "segm_AP": ap, "split": self.data.name}
            record["best"] = True
        return record
