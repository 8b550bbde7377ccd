"""The detector protocol: what every frozen detector hands to the cache.

Conventions used throughout mfcache:
- boxes are ``xyxy`` in **input pixels** (the resized, unpadded image the detector saw);
- memory levels are listed finest first, each flattened row-major (h, w) as Deformable
  DETR does, and cover the *padded* batch; ``valid`` says how much of each is real;
- C1 is the backbone's stride-4 map (the output of its first stage).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from mfcache.config import ExtractConfig, choices
from mfcache.errors import MfcacheError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectorOutput:
    """One batch of frozen-detector outputs.

    queries:        [B, Q, D]  last decoder layer hidden states
    logits:         [B, Q, K]  class logits (sigmoid models; softmax models add a
                               trailing "no object" class and say so in DetectorInfo)
    boxes:          [B, Q, 4]  xyxy, input pixels of each image
    memory:         [B, sum(h*w), D] encoder output, all levels flattened back to back
    spatial_shapes: [L, 2]     (h, w) of each level of the padded batch
    valid:          [B, L, 2]  (h, w) of each level that is covered by the real image
    c1:             [B, C, H/4, W/4] backbone stride-4 map, or None
    """

    queries: Tensor
    logits: Tensor
    boxes: Tensor
    memory: Tensor
    spatial_shapes: Tensor
    valid: Tensor
    c1: Tensor | None = None

    def float(self) -> DetectorOutput:
        """The outputs with every floating tensor in float32 (after a mixed-precision forward)."""
        return DetectorOutput(
            **{
                f.name: v.float() if v is not None and v.is_floating_point() else v
                for f in fields(self)
                for v in [getattr(self, f.name)]
            }
        )


# Preprocess.resize: how pixels are resampled (see there); extract --resize also takes "auto"
RESIZE_PATHS = tuple(path for path in choices(ExtractConfig)["resize"] if path != "auto")
# What a fingerprint written before a Preprocess field existed meant by it: every cache made
# before ``resize`` existed was made on the float path (with the 1/255 rescale).
LEGACY_PREPROCESS = {"resize": "float", "rescale_factor": 1 / 255}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes detector input: DETR's shortest-edge resize, ImageNet
    normalisation, and zero padding of the batch to a multiple of ``pad_divisor``.

    ``resize`` chooses the pixel path (:func:`mfcache.data.transforms.to_input`):
    ``"processor"`` resizes the ``uint8`` image and rounds it back to ``uint8`` before
    ``x * rescale_factor`` and normalisation, with the arithmetic of transformers' image
    processors (their default torchvision backend), so the pixels equal
    ``AutoImageProcessor.from_pretrained(checkpoint)(images)["pixel_values"]`` bit for bit;
    ``"float"`` rescales first and resizes the float image (no rounding; it differs by up
    to one grey level, 0.0175 after ImageNet normalisation); ``"float-noaa"`` is the float
    path without antialiasing, which is what RF-DETR's processor does (its ``processor``
    path). A detector's outputs follow its preprocessing, so the path is part of the cache
    fingerprint.

    ``fixed_size = (h, w)`` replaces the aspect-preserving resize by a plain resize to
    exactly that size, as RT-DETR-style processors do (their ``size={"height", "width"}``);
    those processors also skip normalisation, expressed as ``mean=(0,0,0), std=(1,1,1)``.

    Padding to a multiple of the coarsest stride makes every level's valid size exactly
    ``ceil(input / stride)``, so the cache can plan token offsets before the detector runs.
    ``pad_size = (h, w)`` pads every batch to at least that canvas (transformers'
    ``pad_size``): a detector trained on batches padded to one canvas can depend on it, and
    with it an image's outputs no longer depend on which images share its batch.
    Padding is the one place where mfcache deliberately differs from the processors: they
    pad a batch to its largest image (or to exactly ``pad_size``), which makes an image's
    input depend on its batch mates; mfcache pads to a multiple of ``pad_divisor`` (and to
    at least ``pad_size``). Padding is zeros after normalisation in both, and the real
    pixels and ``pixel_mask`` are the same.
    """

    shortest_edge: int = 800
    longest_edge: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pad_divisor: int = 64
    fixed_size: tuple[int, int] | None = None
    pad_size: tuple[int, int] | None = None
    resize: str = "processor"
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1] (transformers' rescale_factor; 1.0 without do_rescale)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the resized image; the same rule as transformers' DETR processors
        (or ``fixed_size`` when set, whatever the image's aspect ratio)."""
        if self.fixed_size is not None:
            return int(self.fixed_size[0]), int(self.fixed_size[1])
        size, max_size = self.shortest_edge, self.longest_edge
        raw_size = None
        small, large = float(min(height, width)), float(max(height, width))
        if large / small * size > max_size:
            raw_size = max_size * small / large
            size = int(round(raw_size))
        if (height <= width and height == size) or (width <= height and width == size):
            return height, width
        if width < height:
            oh = int((raw_size if raw_size is not None else size) * height / width)
            return oh, size
        ow = int((raw_size if raw_size is not None else size) * width / height)
        return size, ow


def level_shapes(input_hw: tuple[int, int], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """Valid (h, w) of each feature level for an input of ``input_hw`` pixels."""
    h, w = input_hw
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


@dataclass(frozen=True)
class DetectorInfo:
    """Everything about a detector that its cached outputs depend on (the fingerprint).

    ``prompts``: the text phrases an open-vocabulary detector was run with, one per label
    (its ``label_names`` are these phrases, :meth:`Detector.set_prompts`); ``()`` for a
    detector with fixed classes."""

    spec: str
    family: str
    d_model: int
    num_queries: int
    label_names: tuple[str, ...]
    strides: tuple[int, ...]
    c1_channels: int
    sigmoid: bool
    weights_sha256: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    trained: bool = True
    prompts: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorInfo:
        d = dict(d)
        preprocess = {**LEGACY_PREPROCESS, **d["preprocess"]}
        d["preprocess"] = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()})
        for key in ("label_names", "strides", "prompts"):
            if key in d:  # caches written before prompts existed have none
                d[key] = tuple(d[key])
        return cls(**d)


class Detector(nn.Module):
    """A frozen detector: ``forward(pixel_values [B,3,H,W], pixel_mask [B,H,W] bool)``
    returns a :class:`DetectorOutput`. Subclasses set ``info`` and implement ``forward``.

    An open-vocabulary detector (``open_vocabulary``) takes its classes from text: it runs only
    after :meth:`set_prompts`, and its labels are the phrases."""

    info: DetectorInfo
    open_vocabulary: ClassVar[bool] = False

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> DetectorOutput:  # pragma: no cover
        raise NotImplementedError

    def c1_stem(self) -> nn.Module | None:
        """The frozen part of the backbone that makes C1 on its own: ``[B, 3, H, W]`` normalised
        pixels -> ``[B, C, H/4, W/4]`` (``--c1 recompute`` exports it into the cache), or None
        if this detector cannot separate it."""
        return None

    def set_prompts(self, phrases: Sequence[str]) -> None:
        """Make ``phrases`` (one per class) this detector's classes: its labels, in that order
        (``info.label_names == info.prompts == tuple(phrases)``). Detectors with fixed classes refuse."""
        raise MfcacheError(
            f"{self.info.spec} ({self.info.family}) has fixed classes; `extract.prompts` applies to "
            "open-vocabulary detectors (grounding-dino, mm-grounding-dino, omdet-turbo)"
        )


@dataclass
class TopK:
    """The k best (query, class) pairs of each image, as the model's post-processing ranks them.

    scores [B, k], labels [B, k] (model label index), query_index [B, k],
    boxes [B, k, 4] xyxy input pixels, queries [B, k, D].
    """

    scores: Tensor
    labels: Tensor
    query_index: Tensor
    boxes: Tensor
    queries: Tensor


def select_topk(out: DetectorOutput, k: int, *, sigmoid: bool, agnostic: bool = False) -> TopK:
    """Top-k detections per image, keeping the query index that transformers'
    ``post_process_object_detection`` drops.

    Sigmoid models rank all (query, class) pairs (a query may appear with two labels), or,
    ``agnostic`` (class-agnostic caches), each query once under its best class; softmax
    models take each query's best real class (the last class is "no object").
    """
    logits = out.logits.float()
    batch, num_queries, num_classes = logits.shape
    if sigmoid and not agnostic:
        prob = logits.sigmoid().reshape(batch, -1)
        k = min(k, prob.shape[1])
        scores, flat = prob.topk(k, dim=1)
        query_index = torch.div(flat, num_classes, rounding_mode="floor")
        labels = flat % num_classes
    else:
        prob = logits.sigmoid() if sigmoid else logits.softmax(-1)[..., :-1]
        best, best_label = prob.max(-1)
        k = min(k, num_queries)
        scores, query_index = best.topk(k, dim=1)
        labels = best_label.gather(1, query_index)
    boxes = out.boxes.gather(1, query_index[..., None].expand(-1, -1, 4))
    queries = out.queries.gather(1, query_index[..., None].expand(-1, -1, out.queries.shape[-1]))
    return TopK(scores=scores, labels=labels, query_index=query_index, boxes=boxes, queries=queries)


def state_dict_sha256(module: nn.Module) -> str:
    """Content hash of a module's weights (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
