"""From a batch and a head to each image's :class:`Instances` and COCO results: which
detections run the head, their mask probabilities and scores, and each image's masks pasted
into its original pixels.

Used by evaluation (batches from the cache) and ``predict`` (batches straight from the
detector), so both report exactly the same detections for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from mfcache.cache.sample import Batch
from mfcache.cache.targets import scale_boxes
from mfcache.config import RunConfig
from mfcache.errors import MfcacheError
from mfcache.heads import HeadOutput, MaskHead
from mfcache.metrics import results_from_detections
from mfcache.ops.masks import encode_rle, paste_masks
from mfcache.runtime import autocast


def run_head(head: torch.nn.Module, batch: Batch, select: Tensor | None = None) -> HeadOutput:
    """``head`` (or its DDP wrapper) on ``batch``: the ``select [B, K]`` detections (None = all),
    each image read from its own valid maps."""
    return head(batch.queries, batch.boxes, batch.levels, batch.c1, select, level_hw=batch.level_hw, c1_hw=batch.c1_hw)


def first_detections(query_index: Tensor, select: Tensor) -> Tensor:
    """``query_index``, ``select [B, K]`` -> ``[B, K]`` long: for each detection, the position of
    the first selected detection of the same query (its own position if it is that one).

    A sigmoid-classifier DETR lists one query under several labels (top-k over queries x
    classes), each time with the query's own embedding and box: the same mask-head input, the
    same mask and, in training, the same target. So the head runs on each query once.
    """
    same = (query_index[:, :, None] == query_index[:, None, :]) & select[:, None, :]
    return same.to(torch.uint8).argmax(-1)  # the first True; 0 where none (unselected rows)


def once_per_query(query_index: Tensor, select: Tensor) -> Tensor:
    """``[B, K]`` bool: ``select`` keeping only each query's first selected detection."""
    positions = torch.arange(select.shape[1], device=select.device)
    return select & (first_detections(query_index, select) == positions)


def kept_queries(labels: Tensor, to_category: Tensor, max_detections: int, query_index: Tensor | None = None) -> Tensor:
    """``[B, K]`` bool: the detections evaluation reports, i.e. labels that map to a dataset
    category (``to_category [num labels]``, -1 = none), the first ``max_detections`` of each
    image in score order (the cache stores queries in score order). With ``query_index
    [B, K]``, a query listed under several labels that map to one category (a label map
    that merges labels) is reported once, at its best-scoring listing."""
    category = to_category.to(labels.device)[labels]
    mapped = category >= 0
    if query_index is not None:
        same = (query_index[:, :, None] == query_index[:, None, :]) & (category[:, :, None] == category[:, None, :])
        earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=same.device).tril(-1)  # [i, j]: j < i
        mapped = mapped & ~(same & earlier).any(-1)
    return mapped & (mapped.cumsum(1) <= max_detections)


def mask_probs(
    head: MaskHead, batch: Batch, select: Tensor | None = None, amp: str = "off"
) -> tuple[Tensor, Tensor | None]:
    """Mask probabilities ``[B, K, M, M]`` float32 inside each detection's box, and the head's
    predicted quality ``[B, K]`` (None if the head has no scoring branch). With ``select
    [B, K]`` only the selected detections get masks; the others are left at zero. The head
    runs once per query (:func:`first_detections`), under mixed precision ``amp``; a query's
    other detections share its mask."""
    b, k = batch.queries.shape[:2]
    if select is None:
        select = torch.ones(b, k, dtype=torch.bool, device=batch.queries.device)
    first = first_detections(batch.query_index, select)
    run = once_per_query(batch.query_index, select)
    with autocast(batch.queries.device, amp):
        out = run_head(head, batch, run).float()
    m = out.mask_logits.shape[-1]
    prob = out.mask_logits.new_zeros(b, k, m, m)
    prob[run] = out.mask_logits.sigmoid()[:, 0]
    prob = prob.gather(1, first[..., None, None].expand(-1, -1, m, m)) * select[..., None, None]
    if out.quality is None:
        return prob, None
    quality = out.quality.new_zeros(b, k)
    quality[run] = out.quality.reshape(-1)
    return prob, quality.gather(1, first) * select


def foreground_prob(mask_prob: Tensor) -> Tensor:
    """``[N, ...]`` probabilities -> ``[N]``: the mean probability of each mask's pixels > 0.5
    (0 where there are none)."""
    fg = (mask_prob > 0.5).to(mask_prob.dtype)
    return (mask_prob * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1.0)


def pasted_foreground_prob(
    box_probs: Tensor, boxes: Tensor, image_hw: tuple[int, int], chunk_pixels: int = 1 << 24
) -> Tensor:
    """:func:`foreground_prob` of the masks pasted into the image: ``box_probs [N, M, M]``,
    ``boxes [N, 4]`` xyxy original px, ``image_hw`` (H, W) -> ``[N]``. Each pixel of the image
    counts once (a box's part outside the image, none; a large box, many pixels per mask cell),
    as the paper's s_i is taken on the final mask. A few masks at a time (at most
    ``chunk_pixels`` float pixels), never all N pasted at once."""
    per_chunk = max(1, chunk_pixels // max(1, image_hw[0] * image_hw[1]))
    parts = [
        foreground_prob(paste_masks(box_probs[s : s + per_chunk], boxes[s : s + per_chunk], image_hw, threshold=None))
        for s in range(0, len(box_probs), per_chunk)
    ]
    return torch.cat(parts) if parts else box_probs.new_zeros(0)


def mask_scores(
    class_scores: Tensor,
    mask_prob: Tensor,
    scoring: str,
    quality: Tensor | None = None,
    foreground: Tensor | None = None,
) -> Tensor:
    """[N] class scores x (for ``mask_prob``) the mean probability of the pixels > 0.5 of
    each [N, M, M] mask (the paper's baseline rescoring; ``foreground [N]``: that mean taken
    elsewhere, e.g. :func:`pasted_foreground_prob`), or x (for ``mask_iou``) the head's
    predicted mask quality ``[N]``."""
    if scoring == "class":
        return class_scores
    if scoring == "mask_iou":
        if quality is None:
            raise MfcacheError("scoring mask_iou needs a head with a quality branch (HeadOutput.quality)")
        return class_scores * quality
    return class_scores * (foreground_prob(mask_prob) if foreground is None else foreground)


# Output pixels pasted at once when masks are produced chunk by chunk: 64 MiB of bool masks,
# so a 4000x3000 photo with 100 detections never holds 1.2 GB of them.
CHUNK_PIXELS = 1 << 26


@dataclass
class Instances:
    """One image's detections in its original pixels (what ``predict`` writes, and what
    :class:`mfcache.api.Predictor` returns), in the detector's order (its class score; not
    re-sorted by the final score).

    boxes ``[N, 4]`` float32 xyxy, absolute pixels; scores ``[N]`` float32 (the head's
    scoring: class score, x mask probability or x predicted IoU); labels ``[N]`` int64 dataset
    category ids (CPU tensors); box_probs ``[N, M, M]`` float32 mask probabilities inside each
    box (on the device the head ran on); image_size (H, W); category_names: {category id:
    name} of the dataset the head was trained on.

    ``masks`` ``[N, H, W]`` bool (CPU) are ``box_probs`` pasted into the image and thresholded
    at ``mask_threshold``, only when first asked for (then kept): a 4000x3000 photo's 100 masks
    are 1.2 GB, so ``to_coco`` and :meth:`mask_chunks` paste a few at a time instead.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    box_probs: Tensor
    image_size: tuple[int, int]
    mask_threshold: float = 0.5
    category_names: dict[int, str] = field(default_factory=dict)
    _masks: Tensor | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, index) -> Instances:
        """The instances ``index`` selects (a slice, ``[N]`` bool mask, indices or one int)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        on_device = index.to(self.box_probs.device) if isinstance(index, Tensor) else index
        return replace(
            self,
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=self.labels[index],
            box_probs=self.box_probs[on_device],
            _masks=None if self._masks is None else self._masks[index],
        )

    @property
    def masks(self) -> Tensor:
        """``[N, H, W]`` bool at the original image size (pasted on first use, then kept)."""
        if self._masks is None:
            self._masks = self._paste(slice(None))
        return self._masks

    def mask_chunks(self, max_pixels: int | None = None):
        """Yield ``(start, masks [n, H, W] bool)``: instances ``start .. start + n`` pasted, at
        most ``max_pixels`` (default :data:`CHUNK_PIXELS`) output pixels per chunk, at least one
        mask — the same masks as :attr:`masks`, never all held at once."""
        max_pixels = CHUNK_PIXELS if max_pixels is None else max_pixels
        per_chunk = max(1, max_pixels // max(1, self.image_size[0] * self.image_size[1]))
        for start in range(0, len(self), per_chunk):
            part = slice(start, start + per_chunk)
            yield start, (self._masks[part] if self._masks is not None else self._paste(part))

    def _paste(self, part: slice) -> Tensor:
        boxes = self.boxes[part].to(self.box_probs.device)
        return paste_masks(self.box_probs[part], boxes, self.image_size, threshold=self.mask_threshold).cpu()

    @property
    def names(self) -> list[str]:
        """The category name of each instance (its id as text if the name is unknown)."""
        return [self.category_names.get(c, str(c)) for c in self.labels.tolist()]

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result dicts (bbox xywh, score, category_id, RLE segmentation), exactly as
        ``mfcache predict`` writes them to results.json (masks pasted chunk by chunk)."""
        rles = [rle for _, masks in self.mask_chunks() for rle in encode_rle(masks)]
        return results_from_detections(image_id, self.boxes, self.scores, self.labels, rles)


def _kept(batch: Batch, b: int, to_category: Tensor, config: RunConfig) -> Tensor:
    """Indices ``[n]`` of image ``b``'s detections that evaluation reports (:func:`kept_queries`)."""
    labels = batch.labels[b].cpu()
    return torch.nonzero(
        kept_queries(labels[None], to_category, config.eval.max_detections, batch.query_index[b].cpu()[None])[0]
    ).flatten()


def image_instances(
    batch: Batch,
    b: int,
    prob: Tensor,
    to_category: Tensor,
    config: RunConfig,
    quality: Tensor | None = None,
    min_score: float = 0.0,
) -> Instances:
    """Image ``b`` of ``batch``, whose mask probabilities are ``prob [K, M, M]``, as
    :class:`Instances`: the detections :func:`kept_queries` selects scoring at least
    ``min_score`` (only those are pasted), boxes and masks in original pixels. ``quality
    [K]``: the head's predicted mask quality, needed by ``mask_iou`` scoring."""
    keep = _kept(batch, b, to_category, config)
    orig_hw = tuple(batch.orig_hw[b].tolist())
    boxes = scale_boxes(batch.boxes[b][keep], tuple(batch.input_hw[b].tolist()), orig_hw)
    foreground = None
    if config.head.scoring == "mask_prob" and config.eval.mask_prob_at == "image":
        foreground = pasted_foreground_prob(prob[keep], boxes.to(prob.device), orig_hw)
    scores = mask_scores(
        batch.scores[b][keep], prob[keep], config.head.scoring, None if quality is None else quality[keep], foreground
    )
    if min_score > 0:
        passing = (scores >= min_score).cpu()
        keep, scores, boxes = keep[passing], scores[passing.to(scores.device)], boxes[passing.to(boxes.device)]
    return Instances(
        boxes.cpu(),
        scores.cpu(),
        to_category[batch.labels[b].cpu()][keep],
        box_probs=prob[keep],
        image_size=orig_hw,
        mask_threshold=config.eval.mask_threshold,
    )


def image_results(
    batch: Batch, b: int, found: Instances, to_category: Tensor, config: RunConfig, box_filled: bool = False
) -> dict[str, list[dict]]:
    """COCO results of image ``b`` of ``batch``, whose :class:`Instances` are ``found``
    (:func:`image_instances`, every detection evaluation reports): ``{"head": [...]}`` and,
    with ``box_filled``, the same detections with each mask set to its whole box (scored by
    the class score)."""
    image_id = batch.image_id[b]
    results = {"head": found.to_coco(image_id)}
    if box_filled:
        keep = _kept(batch, b, to_category, config)
        boxes = found.boxes.to(found.box_probs.device)
        filled = paste_masks(torch.ones_like(found.box_probs), boxes, found.image_size, threshold=0.5)
        results["box_filled"] = results_from_detections(
            image_id, found.boxes, batch.scores[b][keep].cpu(), found.labels, encode_rle(filled.cpu())
        )
    return results


def batch_instances(
    head: MaskHead, batch: Batch, to_category: Tensor, config: RunConfig, min_score: float = 0.0
) -> list[Instances]:
    """:func:`image_instances` of every image of ``batch`` (on the head's device), the head run
    once on the detections evaluation reports."""
    kept = kept_queries(batch.labels, to_category, config.eval.max_detections, batch.query_index)
    prob, quality = mask_probs(head, batch, kept, amp=config.eval.amp)
    return [
        image_instances(batch, b, prob[b], to_category, config, None if quality is None else quality[b], min_score)
        for b in range(len(batch))
    ]


def batch_results(
    head: MaskHead, batch: Batch, to_category: Tensor, config: RunConfig, box_filled: bool = False
) -> list[dict[str, list[dict]]]:
    """:func:`image_results` of every image of ``batch``: its :func:`batch_instances` as COCO results."""
    found = batch_instances(head, batch, to_category, config)
    return [image_results(batch, b, image, to_category, config, box_filled) for b, image in enumerate(found)]
