"""From a batch and a head to COCO results: which detections run the head, their mask
probabilities and scores, and each image's masks pasted into its original pixels.

Used by evaluation (batches from the cache) and ``predict`` (batches straight from the
detector), so both report exactly the same detections for the same inputs.
"""

from __future__ import annotations

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
    return head(batch.queries, batch.boxes, batch.levels, batch.c1, select, level_hw=batch.level_hw,
                c1_hw=batch.c1_hw)


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


def kept_queries(labels: Tensor, to_category: Tensor, max_detections: int, query_index: Tensor | None = None
                 ) -> Tensor:
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


def mask_probs(head: MaskHead, batch: Batch, select: Tensor | None = None, amp: str = "off"
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


def mask_scores(class_scores: Tensor, mask_prob: Tensor, scoring: str, quality: Tensor | None = None) -> Tensor:
    """[N] class scores x (for ``mask_prob``) the mean probability of the pixels > 0.5 of
    each [N, M, M] mask (the paper's baseline rescoring), or x (for ``mask_iou``) the
    head's predicted mask quality ``[N]``."""
    if scoring == "class":
        return class_scores
    if scoring == "mask_iou":
        if quality is None:
            raise MfcacheError("scoring mask_iou needs a head with a quality branch (HeadOutput.quality)")
        return class_scores * quality
    fg = (mask_prob > 0.5).float()
    return class_scores * (mask_prob * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1.0)


def image_results(batch: Batch, b: int, prob: Tensor, to_category: Tensor, config: RunConfig,
                  box_filled: bool = False, quality: Tensor | None = None) -> dict[str, list[dict]]:
    """COCO results of image ``b`` of ``batch``, whose mask probabilities are ``prob [K, M, M]``:
    the detections :func:`kept_queries` selects, boxes and masks in original pixels.
    ``{"head": [...]}`` and, with ``box_filled``, the same detections with each mask set to
    its whole box (scored by the class score). ``quality [K]``: the head's predicted mask
    quality, needed by ``mask_iou`` scoring."""
    labels = batch.labels[b].cpu()
    category = to_category[labels]
    keep = torch.nonzero(kept_queries(labels[None], to_category, config.eval.max_detections,
                                      batch.query_index[b].cpu()[None])[0]).flatten()
    orig_hw = tuple(batch.orig_hw[b].tolist())
    boxes = scale_boxes(batch.boxes[b][keep], tuple(batch.input_hw[b].tolist()), orig_hw)
    scores = mask_scores(batch.scores[b][keep], prob[keep], config.head.scoring,
                         None if quality is None else quality[keep])
    masks = paste_masks(prob[keep], boxes, orig_hw, threshold=config.eval.mask_threshold)
    image_id = batch.image_id[b]
    results = {"head": results_from_detections(image_id, boxes.cpu(), scores.cpu(), category[keep],
                                               encode_rle(masks.cpu()))}
    if box_filled:
        filled = paste_masks(torch.ones_like(prob[keep]), boxes, orig_hw, threshold=0.5)
        results["box_filled"] = results_from_detections(
            image_id, boxes.cpu(), batch.scores[b][keep].cpu(), category[keep], encode_rle(filled.cpu()))
    return results


def batch_results(head: MaskHead, batch: Batch, to_category: Tensor, config: RunConfig,
                  box_filled: bool = False) -> list[dict[str, list[dict]]]:
    """:func:`image_results` of every image of ``batch`` (on the head's device), the head run
    once on the detections evaluation reports."""
    kept = kept_queries(batch.labels, to_category, config.eval.max_detections, batch.query_index)
    prob, quality = mask_probs(head, batch, kept, amp=config.eval.amp)
    return [image_results(batch, b, prob[b], to_category, config, box_filled,
                          None if quality is None else quality[b]) for b in range(len(batch))]
