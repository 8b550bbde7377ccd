"""Overlays: what changes in the picture, and what must not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfcache.ops.masks import encode_rle
from mfcache.stages.visualize import decode_results, label_edges, overlay, palette, side_by_side


def disk(h, w, cy, cx, r):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def scene():
    """A textured 90 x 120 image with three instances (two overlapping) and their boxes."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(40, 200, (3, 90, 120), dtype=torch.uint8, generator=g)
    masks = torch.stack([disk(90, 120, 30, 30, 15), disk(90, 120, 40, 45, 12), disk(90, 120, 65, 95, 10)])
    boxes = torch.tensor([[14.6, 14.2, 46.3, 46.0], [32.0, 27.5, 58.0, 53.0], [84.0, 54.0, 106.0, 76.0]])
    return image, masks, boxes


def box_pixels(boxes, h, w):
    """Every pixel that a box touches at all (generous: any overlap)."""
    region = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        region[max(0, math.floor(y0)) : math.ceil(y1), max(0, math.floor(x0)) : math.ceil(x1)] = True
    return region


def test_overlay_changes_only_masks_and_boxes():
    image, masks, boxes = scene()
    picture = overlay(image, masks, boxes, ["ring", "star", "plus"], torch.tensor([0.9, 0.5, 0.87]))
    assert picture.size == (120, 90) and picture.mode == "RGB"
    drawn = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    changed = (drawn != image).any(0)
    outside = ~(masks.any(0) | box_pixels(boxes, 90, 120))
    assert outside.sum() > 5000 and not changed[outside].any()
    # every mask pixel is coloured (fill or outline), and the text tags add more inside the boxes
    assert changed[masks.any(0)].float().mean() > 0.95
    again = overlay(image, masks, boxes, ["ring", "star", "plus"], torch.tensor([0.9, 0.5, 0.87]))
    assert np.array_equal(np.asarray(again), np.asarray(picture))


def test_fill_is_an_alpha_blend_and_the_best_score_is_on_top():
    image = torch.full((3, 40, 40), 100, dtype=torch.uint8)
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 5:30, 5:30] = True
    masks[1, 15:35, 15:35] = True
    colors = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    far = torch.tensor([[-50.0, -50, -40, -40], [-50, -50, -40, -40]])  # boxes off the image: no frames, no tags
    for scores, top in ((torch.tensor([0.9, 0.2]), 0), (torch.tensor([0.2, 0.9]), 1)):
        out = np.asarray(overlay(image, masks, far, ["a", "b"], scores, alpha=0.5, outline=1, colors=colors))
        expected = np.round(0.5 * 100 + 0.5 * colors[top].astype(float))
        assert np.array_equal(out[20, 20], expected)  # interior of the overlap
        assert np.array_equal(out[10, 10], [178, 50, 50])  # only mask 0 (interior): blend with red
        assert np.array_equal(out[5, 10], colors[0])  # mask 0's boundary: solid colour
    assert np.array_equal(out[0, 0], [100, 100, 100])


def test_label_edges_are_region_minus_erosion():
    masks = torch.zeros(3, 30, 30, dtype=torch.bool)
    masks[0, 5:15, 5:15] = True
    masks[1] = disk(30, 30, 15, 15, 9)
    masks[2, 0:10, 0:30] = True  # touches the image border
    for width in (1, 2):
        k = 2 * width + 1
        eroded = -F.max_pool2d(-F.pad(masks[:, None].float(), [width] * 4, value=1.0), k, stride=1)[:, 0] > 0
        for mask, erosion in zip(masks, eroded):
            assert torch.equal(label_edges(mask.long() * 7, width), mask & ~erosion)
    assert int(label_edges(masks[0].long(), 1).sum()) == 36 and int(label_edges(masks[0].long(), 2).sum()) == 64
    assert not label_edges(masks[2].long(), 1)[0].any()  # the image border is not an edge
    # two touching regions: both sides of the seam are edges
    labels = torch.zeros(10, 10, dtype=torch.long)
    labels[2:8, 2:5], labels[2:8, 5:8] = 1, 2
    edges = label_edges(labels, 1)
    assert edges[4, 4] and edges[4, 5] and not edges[4, 3] and not edges[4, 6]


def test_palette_is_fixed_and_distinct():
    assert np.array_equal(palette(12), palette(12)) and np.array_equal(palette(12)[:5], palette(5))
    assert len({tuple(c) for c in palette(24)}) == 24


def test_overlay_with_nothing_to_draw_is_the_image():
    image, _, _ = scene()
    picture = overlay(image, torch.zeros(0, 90, 120, dtype=torch.bool), torch.zeros(0, 4), [], torch.zeros(0))
    assert np.array_equal(np.asarray(picture), image.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="disagree"):
        overlay(image, torch.zeros(1, 90, 121, dtype=torch.bool), torch.zeros(1, 4), ["x"])


def test_side_by_side_and_decode_results():
    image, masks, boxes = scene()
    a = overlay(image, masks, boxes, ["a", "b", "c"])
    sheet = side_by_side(a, a, titles=("ground truth", "prediction"), gap=8)
    assert sheet.width == 2 * 120 + 8 and sheet.height > 90
    results = [
        {"image_id": 1, "category_id": c, "bbox": [1.0, 2.0, 10.0, 5.0], "score": s, "segmentation": rle}
        for c, s, rle in zip((3, 1, 2), (0.5, 0.25, 1.0), encode_rle(masks))
    ]
    got_masks, got_boxes, scores, categories = decode_results(results, 90, 120)
    assert torch.equal(got_masks, masks) and categories == [3, 1, 2]
    assert torch.equal(got_boxes[0], torch.tensor([1.0, 2.0, 11.0, 7.0])) and scores.tolist() == [0.5, 0.25, 1.0]
    polygon = {"category_id": 1, "bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}
    assert decode_results([polygon], 10, 10)[0].sum() > 9
