"""The shared part of open-vocabulary adapters: detectors whose classes are text phrases.

The phrases come from :meth:`~mfcache.detectors.base.Detector.set_prompts` (``extract`` passes
the dataset's category names or ``--prompts FILE``, :mod:`mfcache.data.prompts`; ``predict``
passes the prompt recorded in the cache). They become the detector's labels, in order, and its
fingerprint's ``prompts``. The text is tokenized once, with the tokenizer saved next to the
model, and the same tokens go with every image of every batch, so an image's outputs never
depend on its batch mates' text. Until a prompt is set the detector refuses to run.

A family implements :meth:`HFOpenVocabDetector._encode_prompts` (phrases -> the text tensors
it keeps, checked against the model's limits) and :meth:`HFDetector._run_model` (the batch
with those tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from mfcache.data.prompts import check_phrases
from mfcache.detectors.hf_base import HFDetector
from mfcache.errors import MfcacheError


class HFOpenVocabDetector(HFDetector):
    """An :class:`HFDetector` whose labels are the phrases of its text prompt."""

    open_vocabulary = True

    def __init__(self, model: nn.Module, *, tokenizer: Any, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.tokenizer = tokenizer
        self.info = replace(self.info, label_names=(), prompts=())  # no classes before a prompt

    def set_prompts(self, phrases: Sequence[str]) -> None:
        phrases = check_phrases(phrases, f"the prompt of {self.info.spec}")
        device = next(self.model.parameters()).device
        for name, tensor in self._encode_prompts(phrases).items():  # buffers: they follow .to(device)
            self.register_buffer(name, tensor.to(device), persistent=False)
        self.info = replace(self.info, label_names=phrases, prompts=phrases)

    def _encode_prompts(self, phrases: tuple[str, ...]) -> dict[str, Tensor]:
        """The text tensors of ``phrases`` this family feeds the model (buffer name -> tensor);
        a prompt beyond the model's limits raises :class:`MfcacheError`."""
        raise NotImplementedError

    def _check_prompted(self) -> None:
        if not self.info.prompts:
            raise MfcacheError(
                f"{self.info.spec}: an open-vocabulary detector needs its text prompt "
                "(set_prompts, or `extract.prompts` / the dataset's category names)"
            )

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor):
        self._check_prompted()
        return super().forward(pixel_values, pixel_mask)
