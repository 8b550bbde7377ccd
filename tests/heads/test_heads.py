import torch

from mfcache.config import HeadConfig
from mfcache.cache.sample import Batch
from mfcache.heads import build_head
from mfcache.ops.losses import mask_losses, resize_targets
from mfcache.stages.postprocess import first_detections, kept_queries, mask_probs, mask_scores, once_per_query
from mfcache.stages.sampling import StepBatches, lr_at


def batch(b=2, k=6, d=16, c=8, h8=5, w8=7):
    torch.manual_seed(0)
    boxes = torch.rand(b, k, 2) * 20
    boxes = torch.cat([boxes, boxes + 4 + torch.rand(b, k, 2) * 20], -1)
    return {
        "queries": torch.randn(b, k, d), "boxes": boxes,
        "levels": [torch.randn(b, d, h8, w8)], "c1": torch.randn(b, c, 2 * h8 - 1, 2 * w8),
    }


def as_batch(x: dict, query_index: torch.Tensor) -> Batch:
    """``x`` as a :class:`Batch` whose maps are all valid (scores, labels, sizes unused here)."""
    b, k = x["queries"].shape[:2]
    level_hw = torch.tensor([m.shape[-2:] for m in x["levels"]]).expand(b, -1, -1)
    return Batch(image_id=list(range(b)), queries=x["queries"], boxes=x["boxes"], scores=torch.ones(b, k),
                 labels=torch.zeros(b, k, dtype=torch.long), query_index=query_index, levels=x["levels"],
                 level_hw=level_hw, input_hw=torch.zeros(b, 2), orig_hw=torch.zeros(b, 2), c1=x["c1"],
                 c1_hw=torch.tensor(x["c1"].shape[-2:]).expand(b, 2))


def test_box_head_shapes_and_backward():
    x = batch()
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
    x = batch()
    head = build_head(HeadConfig(use_c1=False), d_model=16, c1_channels=0, num_levels=4)
    a = head(x["queries"], x["boxes"], x["levels"], None).mask_logits
    moved = x["boxes"].clone()
    moved[0, 0] += 3.0
    b = head(x["queries"], moved, x["levels"], None).mask_logits
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1:], b[1:])


def test_perfect_logits_have_low_loss():
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    good = mask_losses((target * 2 - 1) * 20, target)
    bad = mask_losses(-(target * 2 - 1) * 20, target)
    assert good["bce"] < 1e-3 and good["dice"] < 0.05
    assert bad["bce"] > 5 and bad["dice"] > 0.9


def test_resize_targets_keeps_area():
    t = torch.zeros(1, 64, 64, dtype=torch.bool)
    t[0, 16:48, 8:40] = True
    small = resize_targets(t, 32)
    assert small.shape == (1, 32, 32)
    assert abs(small.sum().item() * 4 - t.sum().item()) < 1e-3


def test_lr_schedule_drops_at_90_and_95_percent():
    lrs = [lr_at(s, 100, 1.0, (0.9, 0.95)) for s in (0, 89, 90, 94, 95, 99)]
    assert lrs == [1.0, 1.0, 0.1, 0.1, 0.1 ** 2, 0.1 ** 2]


def test_step_batches_are_a_function_of_the_step():
    full = list(StepBatches(10, 4, seed=1, start=0, stop=9))
    resumed = list(StepBatches(10, 4, seed=1, start=5, stop=9))
    assert full[5:] == resumed
    assert all(len(b) == 4 and len(set(b)) == 4 for b in full)
    epoch0 = full[0] + full[1]
    assert len(set(epoch0)) == 8


def test_mask_prob_scoring():
    prob = torch.tensor([[[0.9, 0.7], [0.2, 0.1]], [[0.3, 0.2], [0.1, 0.0]]])
    scores = mask_scores(torch.tensor([1.0, 0.5]), prob, "mask_prob")
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.0]))
    torch.testing.assert_close(mask_scores(torch.tensor([1.0, 0.5]), prob, "class"), torch.tensor([1.0, 0.5]))


def test_matmul_roi_align_equals_torchvision():
    from torchvision.ops import roi_align as reference

    from mfcache.heads.roi import roi_align

    torch.manual_seed(1)
    features = torch.randn(3, 5, 12, 17, requires_grad=True)
    xy = torch.rand(20, 2) * 80 - 10  # some boxes cross the border or lie outside
    rois = torch.cat([torch.randint(0, 3, (20, 1)).float(), xy, xy + torch.rand(20, 2) * 30 + 0.5], 1)
    for m, ratio in ((7, 2), (16, 1), (4, 3)):
        ours = roi_align(features, rois, m, 0.25, ratio)
        theirs = reference(features, rois, m, 0.25, ratio, aligned=True)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        g_ours, = torch.autograd.grad(ours.sum(), features)
        g_theirs, = torch.autograd.grad(theirs.sum(), features)
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-4, rtol=1e-4)


def test_eval_runs_the_head_only_on_kept_queries():
    labels = torch.tensor([[0, 2, 1, 2, 0, 1], [2, 2, 0, 1, 1, 0]])
    to_category = torch.tensor([5, 7, -1])  # label 2 maps to no dataset category
    kept = kept_queries(labels, to_category, max_detections=2)
    assert kept.tolist() == [[True, False, True, False, False, False], [False, False, True, True, False, False]]

    x = batch()
    head = build_head(HeadConfig(roi_size=16), d_model=16, c1_channels=8, num_levels=4).eval()
    full, _ = mask_probs(head, as_batch(x, torch.arange(6).expand(2, 6)))
    some, _ = mask_probs(head, as_batch(x, torch.arange(6).expand(2, 6)), kept)
    torch.testing.assert_close(some[kept], full[kept])
    assert (some[~kept] == 0).all()


def test_each_query_runs_once_and_its_other_labels_share_its_mask():
    # top-k over queries x classes: query 7 listed 3 times, query 2 twice
    query_index = torch.tensor([[7, 2, 7, 5, 2, 7], [0, 1, 2, 3, 4, 5]])
    select = torch.tensor([[True, True, True, True, True, True], [True, False, True, True, False, True]])
    assert first_detections(query_index, select)[0].tolist() == [0, 1, 0, 3, 1, 0]
    assert once_per_query(query_index, select).tolist() == [[True, True, False, True, False, False],
                                                            [True, False, True, True, False, True]]
    later = select.clone()
    later[0, 0] = False  # query 7's first selected detection is then position 2
    assert once_per_query(query_index, later)[0].tolist() == [False, True, True, True, False, False]

    x = batch()
    for row, source in enumerate(query_index[0].tolist()):  # duplicates carry their query's embedding and box
        first = query_index[0].tolist().index(source)
        x["queries"][0, row], x["boxes"][0, row] = x["queries"][0, first], x["boxes"][0, first]
    config = HeadConfig(roi_size=16, query_encoder=("self_attn", "box_cross_attn", "ffn"), scoring="mask_iou")
    head = build_head(config, d_model=16, c1_channels=8, num_levels=4).eval()
    with torch.no_grad():
        direct = head(x["queries"], x["boxes"], x["levels"], x["c1"])  # every detection, duplicates included
        prob, quality = mask_probs(head, as_batch(x, query_index))
    torch.testing.assert_close(prob.flatten(0, 1), direct.mask_logits.sigmoid()[:, 0])
    torch.testing.assert_close(quality.flatten(), direct.quality.reshape(-1))


def test_point_loss_draws_each_images_points_from_its_own_generator():
    """An image's sampled points depend on (seed, step, image id) alone: its loss in a batch is
    its share of the batch's loss computed alone, whoever its batch mates are (or its rank)."""
    from mfcache.ops.losses import image_generators, point_mask_losses

    torch.manual_seed(0)
    logits, targets = torch.randn(5, 1, 16, 16), torch.rand(5, 16, 16)
    options = {"num_points": 32, "oversample": 3.0, "importance": 0.75}
    together = point_mask_losses(logits, targets, **options,
                                 generators=image_generators([2, 3], [11, 12], seed=0, step=4))
    first = point_mask_losses(logits[:2], targets[:2], **options, generators=image_generators([2], [11], seed=0, step=4))
    second = point_mask_losses(logits[2:], targets[2:], **options, generators=image_generators([3], [12], seed=0, step=4))
    for key in ("bce", "dice"):
        torch.testing.assert_close(together[key], (2 * first[key] + 3 * second[key]) / 5)
    other_step = point_mask_losses(logits[2:], targets[2:], **options,
                                   generators=image_generators([3], [12], seed=0, step=5))
    assert not torch.equal(other_step["bce"], second["bce"])  # a new draw every step


def test_dot_head_options_build_and_change_the_output_as_stated():
    """head.fused_norm, head.dot_logit and head.query_init (issue 19): each builds, trains
    (finite gradients everywhere) and changes the logits exactly as described."""
    x = batch()
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
        (out.sigmoid().mean()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert build_head(HeadConfig(roi_size=16, predictor="blender"), **args).fusion.norm is None
