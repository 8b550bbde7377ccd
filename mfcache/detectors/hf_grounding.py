"""Grounding DINO and MM Grounding DINO: Deformable-DETR-style detectors that score each query
against the tokens of a text prompt.

Prompt. The phrases are lowercased and joined as ``"ring. star. crescent."``, exactly as
``GroundingDinoProcessor`` merges a list of labels, and tokenized (BERT) once; the model reads
``[CLS] ring . star . crescent . [SEP]`` (``.`` separates phrases: the model's
``special_tokens``), at most ``config.max_text_len`` tokens (256 for the released
checkpoints; a longer prompt is refused rather than silently cut).

Classes. The model's ``logits [B, Q, max_text_len]`` score every query against every token.
mfcache's class logit of query ``q`` for phrase ``k`` is the **max over the phrase's tokens**
(its positive map: the tokens whose characters lie inside the phrase), so the sigmoid of a
query's best class is ``post_process_grounded_object_detection``'s score (the max over
tokens) with the separators and ``[CLS]``/``[SEP]`` left out, and its label the phrase holding
that token (the processor decodes the tokens above ``text_threshold`` instead). The official
COCO evaluation averages the probabilities over a phrase's tokens instead; with single-token
category names the two agree.

Memory. ``encoder_last_hidden_state_vision [B, sum(h*w), d_model]``: the image tokens after
the encoder's text-image fusion layers, what the decoder's deformable cross-attention reads.
It depends on the prompt, which is why the prompt is part of the fingerprint. Level shapes and
the padding mask come from a pre-hook on ``model.model.encoder``; boxes are relative to each
unpadded image (valid ratios), as Deformable DETR's.

C1. The Swin backbone's first stage (stride 4, before its patch merging), through
:meth:`HFDetector._find_c1_module`; a timm backbone has none (``c1_channels = 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mfcache.detectors.base import DetectorOutput
from mfcache.detectors.hf_open_vocab import HFOpenVocabDetector
from mfcache.errors import MfcacheError


def prompt_text(phrases: tuple[str, ...]) -> tuple[str, list[tuple[int, int]]]:
    """The text the model reads for ``phrases`` (``GroundingDinoProcessor``'s merge: lowercased,
    ``". "``-joined, a final ``"."``) and each phrase's character span ``(start, end)`` in it."""
    spans, start = [], 0
    for phrase in phrases:
        spans.append((start, start + len(phrase)))
        start += len(phrase) + 2
    return ". ".join(p.lower() for p in phrases) + ".", spans


def phrase_logits(token_logits: Tensor, token_phrase: Tensor, num_phrases: int) -> Tensor:
    """``token_logits [B, Q, T]`` (T >= the prompt's tokens) -> ``[B, Q, K]``: per phrase the max
    over its tokens; ``token_phrase [T_prompt]`` is each token's phrase index, -1 for none."""
    keep = (token_phrase >= 0).nonzero().squeeze(1)
    scores = token_logits[..., keep]
    out = scores.new_full((*scores.shape[:-1], num_phrases), float("-inf"))
    return out.scatter_reduce(-1, token_phrase[keep].expand_as(scores), scores, reduce="amax")


class HFGroundingDino(HFOpenVocabDetector):
    """Grounding DINO (``GroundingDinoForObjectDetection``)."""

    family = "grounding-dino"
    model_class = "GroundingDinoForObjectDetection"

    def _conv_encoder(self) -> nn.Module:
        return self.model.model.backbone.conv_encoder

    def _install_hooks(self) -> None:
        self._handles.append(
            self.model.model.encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True)
        )

    def _encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stash["spatial_shapes"] = [(int(h), int(w)) for h, w in kwargs["spatial_shapes_list"]]
        self._stash["level_mask"] = ~kwargs["vision_attention_mask"]  # [B, sum(h*w)], True = real

    def _encode_prompts(self, phrases: tuple[str, ...]) -> dict[str, Tensor]:
        text, spans = prompt_text(phrases)
        tokens = self.tokenizer(text, return_offsets_mapping=True, return_token_type_ids=True)
        ids, limit = tokens["input_ids"], int(self.model.config.max_text_len)
        if len(ids) > limit:
            raise MfcacheError(
                f"the prompt of {self.info.spec} is {len(ids)} tokens ({len(phrases)} phrases); "
                f"the model reads at most {limit} (max_text_len): use fewer or shorter phrases"
            )
        owner = [
            next((k for k, (a, b) in enumerate(spans) if e > s and a <= s and e <= b), -1)
            for s, e in tokens["offset_mapping"]
        ]
        separators = set(self.model.model.special_tokens.tolist())
        for k, phrase in enumerate(phrases):
            mine = [i for i, o in zip(ids, owner) if o == k]
            if not mine or separators & set(mine):
                why = "has no tokens" if not mine else "holds a token the model reads as a phrase separator (. or ?)"
                raise MfcacheError(f"the prompt of {self.info.spec}: phrase {phrase!r} {why}")
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {
            "_input_ids": as_row(ids),
            "_attention_mask": as_row(tokens["attention_mask"]),
            "_token_type_ids": as_row(tokens["token_type_ids"]),
            "_token_phrase": as_row(owner)[0],
        }

    def _run_model(self, pixel_values: Tensor, pixel_mask: Tensor) -> Any:
        batch = pixel_values.shape[0]  # the same text for every image
        return self.model(
            pixel_values=pixel_values,
            pixel_mask=pixel_mask.to(torch.long),
            input_ids=self._input_ids.expand(batch, -1),
            attention_mask=self._attention_mask.expand(batch, -1),
            token_type_ids=self._token_type_ids.expand(batch, -1),
        )

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        return self._stashed_output(
            raw,
            pixel_mask,
            raw.encoder_last_hidden_state_vision,
            logits=phrase_logits(raw.logits, self._token_phrase, len(self.info.prompts)),
        )


class HFMMGroundingDino(HFGroundingDino):
    """MM Grounding DINO (mmdetection's re-training; the same inputs and outputs, a scaled and
    biased token similarity)."""

    family = "mm-grounding-dino"
    model_class = "MMGroundingDinoForObjectDetection"
