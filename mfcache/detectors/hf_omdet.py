"""OmDet-Turbo: an RT-DETR-style detector whose classes are CLIP text embeddings.

Prompt. Each phrase is tokenized on its own (CLIP, padded and cut to 77 tokens, as
``OmDetTurboProcessor`` does; a longer phrase is refused) and embedded once as a class; the
task prompt is the processor's default ``"Detect ring, star, crescent."``, cut to 77 tokens
as the processor cuts it (with many classes its tail is lost, as in transformers). Both are
computed once per prompt, with batch size 1, and reused for every batch: the model's own
forward re-embeds them per batch through an LRU cache of 100 entries, which makes outputs
depend on what ran before once a prompt has more classes than that. The adapter therefore
runs the model's parts itself (vision backbone, encoder, decoder), as its ``forward`` does.

Classes. ``decoder_class_logits [B, Q, K]`` is already one logit per phrase (scaled cosine
similarity); the top-k over (query, phrase) pairs equals
``post_process_grounded_object_detection`` before its NMS (``nms_threshold=1.0``), whose
boxes are clipped to the image: the adapter clips them to the input image too.

Memory. The decoder's deformable cross-attention reads the encoder's maps after the decoder's
``channel_projection_layers`` (to ``decoder_hidden_dim``), flattened: forward hooks on those
layers give them. The image encoder does not see the text (the prompt enters in the decoder),
so the memory does not depend on the prompt; the queries, scores and top-k do. The model
ignores ``pixel_mask``: one fixed input size, boxes relative to the canvas, valid sizes
``ceil(input / stride)`` (:func:`valid_from_strides`).

C1. The Swin backbone's first stage, for transformers Swin backbones; the released checkpoint
uses a timm Swin (``timm`` needed), which has none here (``c1_channels = 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mfcache.detectors.base import DetectorOutput, Preprocess
from mfcache.detectors.hf_base import input_hw_from_mask, valid_from_strides
from mfcache.detectors.hf_open_vocab import HFOpenVocabDetector
from mfcache.errors import MfcacheError

CLIP_TEXT_LENGTH = 77  # OmDetTurboProcessor pads and cuts every text to this many tokens


def task_prompt(phrases: tuple[str, ...]) -> str:
    """``OmDetTurboProcessor``'s default task text for ``phrases``."""
    return f"Detect {', '.join(phrases)}."


class HFOmDetTurbo(HFOpenVocabDetector):
    """OmDet-Turbo (``OmDetTurboForObjectDetection``)."""

    family = "omdet-turbo"
    model_class = "OmDetTurboForObjectDetection"
    boxes_relative_to_canvas = True
    default_preprocess = Preprocess(fixed_size=(640, 640))  # its processor: a plain 640 x 640 resize

    def _d_model(self) -> int:
        return int(self.model.config.decoder_hidden_dim)  # queries and projected memory

    def _conv_encoder(self) -> nn.Module:
        return self.model.vision_backbone

    def _backbone(self) -> nn.Module:
        return self.model.vision_backbone.vision_backbone

    def _backbone_features(self, pixel_values: Tensor, pixel_mask: Tensor) -> list[Tensor]:
        return list(self.model.vision_backbone(pixel_values))

    def _install_hooks(self) -> None:
        for level, layer in enumerate(self.model.decoder.channel_projection_layers):
            self._handles.append(layer.register_forward_hook(self._projection_hook(level)))

    def _projection_hook(self, level: int):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            self._stash[f"memory{level}"] = output  # [B, decoder_hidden_dim, h_l, w_l]

        return hook

    def _encode_prompts(self, phrases: tuple[str, ...]) -> dict[str, Tensor]:
        lengths = [len(ids) for ids in self.tokenizer(list(phrases))["input_ids"]]
        if max(lengths) > CLIP_TEXT_LENGTH:
            long = phrases[lengths.index(max(lengths))]
            raise MfcacheError(
                f"the prompt of {self.info.spec}: phrase {long!r} is {max(lengths)} tokens; "
                f"the model reads at most {CLIP_TEXT_LENGTH}"
            )
        as_text = dict(padding="max_length", truncation=True, max_length=CLIP_TEXT_LENGTH, return_tensors="pt")
        device = next(self.model.parameters()).device
        classes = self.tokenizer(list(phrases), **as_text).to(device)
        task = self.tokenizer([task_prompt(phrases)], **as_text).to(device)
        language = self.model.language_backbone
        with torch.no_grad():
            class_features = language(classes["input_ids"], encode_type="class")  # [K, class_embed_dim]
            task_features, task_mask = language(task["input_ids"], mask=task["attention_mask"], encode_type="task")
        return {"_class_features": class_features[:, None], "_task_features": task_features, "_task_mask": task_mask}

    def _run_model(self, pixel_values: Tensor, pixel_mask: Tensor) -> Any:
        """``OmDetTurboForObjectDetection.forward`` with the prompt's text embedded once."""
        model, batch = self.model, pixel_values.shape[0]
        encoded = model.encoder(model.vision_backbone(pixel_values), return_dict=True)
        return model.decoder(
            encoded.extracted_states,
            self._class_features.expand(-1, batch, -1),
            self._task_features.expand(-1, batch, -1),
            self._task_mask.expand(batch, -1),
            return_dict=True,
        )

    def _collect(self, raw: Any, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:
        maps = [self._stash[f"memory{level}"] for level in range(len(self.model.decoder.channel_projection_layers))]
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        shapes = torch.as_tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=memory.device)
        hw = input_hw_from_mask(pixel_mask).to(memory.dtype)
        limit = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1)[:, None]
        boxes = self.boxes_to_input_pixels(raw.decoder_coords[-1], pixel_mask)
        return DetectorOutput(
            queries=raw.last_hidden_state,
            logits=raw.decoder_classes[-1],
            boxes=torch.minimum(boxes.clamp(min=0), limit),  # clipped to the image, as its post-processing
            memory=memory,
            spatial_shapes=shapes,
            valid=valid_from_strides(pixel_mask, self.info.strides, shapes),
            c1=self._stash.get("c1"),
        )
