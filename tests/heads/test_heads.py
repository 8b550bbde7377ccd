"""The composed head: which inputs a query's mask depends on, gradients, the matmul RoIAlign and
the dot-product predictor's options."""

import torch

from mfcache.config import HeadConfig
from mfcache.heads import build_head
from mfcache.ops.losses import mask_losses
from tests.helpers.heads import head_inputs


def test_box_head_shapes_and_backward():
    x = head_inputs()
    head = build_head(HeadConfig(roi_size=16), d_model=16, c1_channels=8, num_levels=4)
    select = torch.zeros(2, 6, dtype=torch.bool)
    select[0, 1] = select[1, 3] = select[1, 5] = True
    out = head(x["queries"], x["boxes"], x["levels"], x["c1"], select)
    assert out.mask_logits.shape == (3, 1, 16, 16)
    target = torch.rand(3, 16, 16).round()
    losses = mask_losses(out.mask_logits, target)
    (losses["bce"] + losses["dice"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    everything = head(x["queries"], x["boxes"], x["levels"], x["c1"])
    assert everything.mask_logits.shape == (12, 1, 16, 16)
    # selecting is the same as computing all and indexing
    torch.testing.assert_close(everything.mask_logits[select.flatten()], out.mask_logits)


def test_mask_of_one_query_depends_on_its_box_only():
    x = head_inputs()
    head = build_head(HeadConfig(use_c1=False), d_model=16, c1_channels=0, num_levels=4)
    a = head(x["queries"], x["boxes"], x["levels"], None).mask_logits
    moved = x["boxes"].clone()
    moved[0, 0] += 3.0
    b = head(x["queries"], moved, x["levels"], None).mask_logits
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1:], b[1:])


def test_matmul_roi_align_equals_torchvision():
    from torchvision.ops import roi_align as reference

    from mfcache.heads.roi import roi_align

    torch.manual_seed(1)
    features = torch.randn(3, 5, 12, 17, requires_grad=True)
    xy = torch.rand(20, 2) * 80 - 10  # some boxes cross the border or lie outside
    rois = torch.cat([torch.randint(0, 3, (20, 1)).float(), xy, xy + torch.rand(20, 2) * 30 + 0.5], 1)
    for method in ("dense", "torchvision", "auto"):
        for m, ratio in ((7, 2), (16, 1), (4, 3)):
            ours = roi_align(features, rois, m, 0.25, ratio, method=method)
            theirs = reference(features, rois, m, 0.25, ratio, aligned=True)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
            (g_ours,) = torch.autograd.grad(ours.sum(), features)
            (g_theirs,) = torch.autograd.grad(theirs.sum(), features)
            torch.testing.assert_close(g_ours, g_theirs, atol=1e-4, rtol=1e-4)


def test_roi_align_path_follows_the_maps_size_and_each_image_is_aligned_alone():
    """``auto`` takes the dense path up to DENSE_MAX_PIXELS, torchvision's above, chosen per
    image from its own map; either way an image's RoIs equal torchvision's on that image alone,
    whatever its batch mates (one map per image, each at its own size)."""
    from torchvision.ops import roi_align as reference

    from mfcache.heads.roi import DENSE_MAX_PIXELS, roi_align, roi_method

    side = int(DENSE_MAX_PIXELS**0.5)
    assert roi_method(side, side) == "dense" and roi_method(side + 1, side) == "torchvision"
    torch.manual_seed(2)
    maps = [torch.randn(4, side + 4, side + 9), torch.randn(4, 20, 30), torch.randn(4, side, side)]  # tv, dense, dense
    xy = torch.rand(12, 2) * 300
    rois = torch.cat([torch.arange(12).remainder(3)[:, None].float(), xy, xy + 8 + torch.rand(12, 2) * 200], 1)
    together = roi_align(maps, rois, 8, 0.25, 2)
    for b, fmap in enumerate(maps):
        mine = rois[:, 0] == b
        alone = reference(fmap[None], [rois[mine, 1:]], 8, 0.25, 2, aligned=True)
        torch.testing.assert_close(together[mine], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            roi_align([fmap], torch.cat([torch.zeros(int(mine.sum()), 1), rois[mine, 1:]], 1), 8, 0.25, 2),
            together[mine],
            atol=0,
            rtol=0,
        )


def test_dot_head_options_build_and_change_the_output_as_stated():
    """head.fused_norm, head.dot_logit and head.query_init (issue 19): each builds, trains
    (finite gradients everywhere) and changes the logits exactly as described."""
    x = head_inputs()
    args = dict(d_model=16, c1_channels=8, num_levels=4)

    def logits(head):
        return head(x["queries"], x["boxes"], x["levels"], x["c1"]).mask_logits

    torch.manual_seed(1)
    base = build_head(HeadConfig(roi_size=16), **args)
    # affine logits: the same logits at init (s = 1, b = 0), then s * (q . R / sqrt(C)) + b
    torch.manual_seed(1)
    affine = build_head(HeadConfig(roi_size=16, dot_logit="affine"), **args)
    torch.testing.assert_close(logits(affine), logits(base))
    with torch.no_grad():
        affine.predictor.logit_scale.fill_(2.0)
        affine.predictor.logit_bias.fill_(-0.5)
    torch.testing.assert_close(logits(affine), 2.0 * logits(base) - 0.5)
    # zero query init: every query predicts 0 everywhere until trained
    zero = build_head(HeadConfig(roi_size=16, query_init="zero"), **args)
    assert torch.count_nonzero(logits(zero)) == 0
    torch.manual_seed(1)
    small = build_head(HeadConfig(roi_size=16, query_init="small"), **args)
    torch.testing.assert_close(small.query_proj.weight, 0.1 * base.query_proj.weight)
    # normalised F: per-pixel LayerNorm (zero mean, unit variance over channels at init)
    for kind in ("layer", "group"):
        head = build_head(HeadConfig(roi_size=16, fused_norm=kind), **args)
        fused = head.fusion([x["levels"][0]], x["c1"])
        for f in fused:
            dims = (0,) if kind == "layer" else (0, 1, 2)
            if kind == "group":
                f = f.reshape(8, -1)  # 8 channels -> gcd(32, 8) = 8 groups of one channel
                dims = (1,)
            torch.testing.assert_close(f.mean(dims), torch.zeros_like(f.mean(dims)), atol=1e-5, rtol=0)
            torch.testing.assert_close(f.var(dims, unbiased=False), torch.ones_like(f.mean(dims)), atol=1e-3, rtol=0)
        out = logits(head)
        assert not torch.allclose(out, logits(base))
        target = (torch.rand(out.shape[0], 16, 16, generator=torch.Generator().manual_seed(2)) > 0.5).float()
        losses = mask_losses(out, target)
        (losses["bce"] + losses["dice"]).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert build_head(HeadConfig(roi_size=16, predictor="blender"), **args).fusion.norm is None
