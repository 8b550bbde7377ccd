"""Head inputs built by hand, as the cache reader serves them (every map valid)."""

import torch

from mfcache.cache.sample import Batch


def head_inputs(b=2, k=6, d=16, c=8, h8=5, w8=7):
    """``b`` images of ``k`` queries: ``queries [b, k, d]``, ``boxes [b, k, 4]`` xyxy (every box at
    least 4 px wide and high), one level ``[b, d, h8, w8]`` and C1 ``[b, c, 2*h8 - 1, 2*w8]``; seed 0."""
    torch.manual_seed(0)
    boxes = torch.rand(b, k, 2) * 20
    boxes = torch.cat([boxes, boxes + 4 + torch.rand(b, k, 2) * 20], -1)
    return {
        "queries": torch.randn(b, k, d),
        "boxes": boxes,
        "levels": [torch.randn(b, d, h8, w8)],
        "c1": torch.randn(b, c, 2 * h8 - 1, 2 * w8),
    }


def as_batch(x: dict, query_index: torch.Tensor) -> Batch:
    """``x`` as a :class:`Batch` whose maps are all valid (scores, labels, sizes unused here)."""
    b, k = x["queries"].shape[:2]
    level_hw = torch.tensor([m.shape[-2:] for m in x["levels"]]).expand(b, -1, -1)
    return Batch(
        image_id=list(range(b)),
        queries=x["queries"],
        boxes=x["boxes"],
        scores=torch.ones(b, k),
        labels=torch.zeros(b, k, dtype=torch.long),
        query_index=query_index,
        levels=x["levels"],
        level_hw=level_hw,
        input_hw=torch.zeros(b, 2),
        orig_hw=torch.zeros(b, 2),
        c1=x["c1"],
        c1_hw=torch.tensor(x["c1"].shape[-2:]).expand(b, 2),
    )
