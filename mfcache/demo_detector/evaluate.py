"""bbox COCO AP of a demo detector model on a shapes split (what the demo trainer selects
its best export by, and what ``benchmarks/preprocessing.py`` reports)."""

from __future__ import annotations

import torch
from torch import nn

from mfcache.data.coco import CocoDataset
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.detectors.base import DetectorOutput, Preprocess, select_topk
from mfcache.detectors.demo import DEMO_PREPROCESS
from mfcache.metrics import coco_evaluate, results_from_detections

TOPK = 100  # detections per image kept for evaluation, as transformers' post-processing does


@torch.no_grad()
def evaluate_bbox(
    model: nn.Module,
    coco: CocoDataset,
    device: torch.device,
    batch_size: int = 8,
    preprocess: Preprocess = DEMO_PREPROCESS,
) -> dict:
    """bbox COCO AP of ``model`` on every image of ``coco`` (top-100 (query, class) pairs
    per image, as transformers' post-processing ranks them). Leaves the model in eval mode."""
    model.eval()
    label_to_category = {}
    for cid, name in coco.category_names.items():
        label_to_category[int(model.config.label2id[name])] = cid
    to_category = torch.tensor([label_to_category.get(i, -1) for i in range(model.config.num_labels)])
    results = []
    for start in range(0, len(coco), batch_size):
        images = coco.images[start : start + batch_size]
        inputs = [to_input(load_image(coco.image_path(im)), preprocess) for im in images]
        pixel_values, pixel_mask = pad_batch(inputs, preprocess)
        raw = model(pixel_values=pixel_values.to(device), pixel_mask=pixel_mask.to(device, torch.long))
        # pred_boxes: cxcywh in [0, 1] of each unpadded input -> xyxy original pixels
        wh = torch.tensor([[im.width, im.height] for im in images], dtype=torch.float32, device=device)
        cx, cy, w, h = raw.pred_boxes.float().unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * wh.repeat(1, 2)[:, None]
        top = select_topk(
            DetectorOutput(
                queries=raw.last_hidden_state,
                logits=raw.logits,
                boxes=xyxy,
                memory=raw.encoder_last_hidden_state,
                spatial_shapes=torch.zeros(0, 2, dtype=torch.long),
                valid=torch.zeros(len(images), 0, 2, dtype=torch.long),
            ),
            TOPK,
            sigmoid=True,
        )
        categories = to_category[top.labels.cpu()]
        for b, im in enumerate(images):
            keep = categories[b] >= 0
            results += results_from_detections(
                im.id, top.boxes[b].cpu()[keep], top.scores[b].cpu()[keep], categories[b][keep], None
            )
    return coco_evaluate(coco.coco, results, iou_types=("bbox",))["bbox"]
