"""Property tests of the mask and matching ops against slow, obvious reference implementations."""

import numpy as np
import pycocotools.mask as mask_utils
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcache.cache.targets import match_queries
from mfcache.data.coco import GroundTruth
from mfcache.ops.masks import crop_mask_targets, encode_rle, paste_masks

SETTINGS = settings(max_examples=25, deadline=None)


def boxes_in(draw, n, h, w, min_side=1.0):
    out = []
    for _ in range(n):
        x0 = draw(st.floats(0, w - min_side - 0.01))
        y0 = draw(st.floats(0, h - min_side - 0.01))
        out.append([x0, y0, draw(st.floats(x0 + min_side, w)), draw(st.floats(y0 + min_side, h))])
    return torch.tensor(out, dtype=torch.float64)


def bilinear_zero_pad(m, u, v):
    """Sample [Mh, Mw] at cell coords (u = column, v = row), zeros outside (grid_sample rules)."""
    x0, y0 = int(np.floor(u)), int(np.floor(v))
    total = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            x, y = x0 + dx, y0 + dy
            weight = (1 - abs(u - x)) * (1 - abs(v - y))
            if 0 <= x < m.shape[1] and 0 <= y < m.shape[0]:
                total += weight * m[y, x]
    return total


@SETTINGS
@given(st.data())
def test_paste_masks_matches_per_pixel_reference(data):
    h, w, m = data.draw(st.integers(4, 14)), data.draw(st.integers(4, 14)), data.draw(st.integers(1, 5))
    n = data.draw(st.integers(1, 3))
    masks = torch.from_numpy(np.random.default_rng(data.draw(st.integers(0, 999))).uniform(size=(n, m, m)))
    boxes = boxes_in(data.draw, n, h, w)
    got = paste_masks(masks, boxes, (h, w), threshold=None)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        for r in range(h):
            for c in range(w):
                u = (c + 0.5 - x0) / (x1 - x0) * m - 0.5  # pixel centre in mask cells
                v = (r + 0.5 - y0) / (y1 - y0) * m - 0.5
                expected = bilinear_zero_pad(masks[i].numpy(), u, v) if -1 < u < m and -1 < v < m else 0.0
                assert abs(float(got[i, r, c]) - expected) < 1e-9


def clamped_bilinear(img, y, x):
    """roi_align's sampling: clamp into the image, bilinear."""
    h, w = img.shape
    y, x = min(max(y, 0.0), h - 1), min(max(x, 0.0), w - 1)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * img[y0, x0]
        + (1 - ly) * lx * img[y0, x1]
        + ly * (1 - lx) * img[y1, x0]
        + ly * lx * img[y1, x1]
    )


@SETTINGS
@given(st.data())
def test_crop_mask_targets_matches_reference(data):
    h, w, size = data.draw(st.integers(6, 16)), data.draw(st.integers(6, 16)), data.draw(st.integers(2, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    gt = torch.from_numpy(rng.uniform(size=(2, h, w)) > 0.5)
    n = data.draw(st.integers(1, 4))
    boxes = boxes_in(data.draw, n, h, w).float()
    index = torch.tensor([data.draw(st.integers(-1, 1)) for _ in range(n)])
    got = crop_mask_targets(gt, boxes, index, size)
    for i, (x0, y0, x1, y1) in enumerate(boxes.double().tolist()):
        if index[i] < 0:
            assert not got[i].any()
            continue
        img = gt[index[i]].double().numpy()
        bw, bh = (x1 - x0) / size, (y1 - y0) / size
        for r in range(size):
            for c in range(size):
                samples = [
                    clamped_bilinear(img, y0 - 0.5 + (r + (sy + 0.5) / 2) * bh, x0 - 0.5 + (c + (sx + 0.5) / 2) * bw)
                    for sy in (0, 1)
                    for sx in (0, 1)
                ]
                value = float(np.mean(samples))
                if abs(value - 0.5) > 1e-4:  # exact ties depend on float rounding
                    assert bool(got[i, r, c]) == (value >= 0.5)


@SETTINGS
@given(st.integers(0, 4), st.integers(1, 12), st.integers(1, 12), st.integers(0, 999))
def test_encode_rle_round_trip(n, h, w, seed):
    masks = torch.from_numpy(np.random.default_rng(seed).uniform(size=(n, h, w)) > 0.6)
    rles = encode_rle(masks)
    assert len(rles) == n
    for mask, rle in zip(masks, rles):
        assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask.numpy())
        assert int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})) == int(mask.sum())


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@SETTINGS
@given(st.data())
def test_match_queries_matches_reference(data):
    k, g = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 5))
    boxes = boxes_in(data.draw, k, 50, 50).float()
    gt_boxes = boxes_in(data.draw, g, 50, 50).float() if g else torch.zeros(0, 4)
    crowd = torch.tensor([data.draw(st.booleans()) for _ in range(g)], dtype=torch.bool)
    gt = GroundTruth(
        masks=torch.zeros(g, 50, 50, dtype=torch.bool),
        boxes=gt_boxes,
        category_ids=torch.zeros(g, dtype=torch.long),
        iscrowd=crowd,
        ann_ids=torch.arange(g),
    )
    index, best = match_queries(boxes, gt)
    for q in range(k):
        ious = [iou(boxes[q].tolist(), gt_boxes[j].tolist()) if not crowd[j] else -1.0 for j in range(g)]
        top = max(ious, default=-1.0)
        if top <= 0:
            assert index[q] == -1
        else:
            assert not crowd[index[q]] and abs(ious[index[q]] - top) < 1e-5 and abs(float(best[q]) - top) < 1e-5
