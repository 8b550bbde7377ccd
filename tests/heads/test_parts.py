"""The head design space: every preset builds, runs forward and backward; parts checked
against hand-computed references."""

import dataclasses
import math

import pytest
import torch

from mfcache.config import HEAD_CHOICES, HeadConfig, preset_names, resolve_run_config
from mfcache.errors import MfcacheError
from mfcache.heads import build_head
from mfcache.heads.blender import blend
from mfcache.heads.region import roi_align_map_per_box
from mfcache.heads.roi import roi_align
from mfcache.ops.losses import head_loss, mask_iou, point_mask_losses, point_sample, resize_targets, uncertain_points

D, C1 = 32, 8


def tiny_batch(b=2, k=5, h8=6, w8=7, levels=4):
    torch.manual_seed(0)
    xy = torch.rand(b, k, 2) * 30
    boxes = torch.cat([xy, xy + 6 + torch.rand(b, k, 2) * 20], -1)
    sizes = [(max(1, h8 >> l), max(1, w8 >> l)) for l in range(levels)]
    return {
        "queries": torch.randn(b, k, D),
        "boxes": boxes,
        "levels": [torch.randn(b, D, h, w) for h, w in sizes],
        "c1": torch.randn(b, C1, 2 * h8 - 1, 2 * w8),
    }


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_trains_one_step(preset):
    """The preset's training loss (its own: BCE + dice on the RoI or on sampled points, plus
    the quality regression where it scores by mask IoU) against a target mask: every parameter
    gets a finite gradient, and one small step down that gradient lowers the loss."""
    run = resolve_run_config(preset)
    config = run.head
    assert config.description, f"preset {preset} has no description"
    head = build_head(config, d_model=D, c1_channels=C1, num_levels=4)
    x = tiny_batch()
    select = torch.zeros(2, 5, dtype=torch.bool)
    select[0, :2] = select[1, 3] = True
    m = head.roi_size
    # a target that is not trivial: each selected query's mask is a different box in its RoI
    targets = torch.zeros(3, 64, 64, dtype=torch.bool)
    for i, (top, left) in enumerate([(4, 8), (20, 10), (30, 24)]):
        targets[i, top : top + 28, left : left + 30] = True
    targets = resize_targets(targets, m)

    # a point loss draws its points uniformly here (no importance sampling, which follows the
    # logits), so the loss before and after the step is taken at the same points
    loss_config = dataclasses.replace(config, importance=0.0)

    def loss_and_output():
        torch.manual_seed(7)  # the same point draws and dropout for both evaluations
        out = head(x["queries"], x["boxes"], [x["levels"][l] for l in head.levels], x["c1"], select)
        return head_loss(out, targets, loss_config, run.train)[0], out

    loss, out = loss_and_output()
    assert out.mask_logits.shape == (3, 1, m, m)
    assert (out.quality is not None) == (config.scoring == "mask_iou")
    loss.backward()
    grads = {name: p.grad for name, p in head.named_parameters()}
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), f"{preset}: no finite grad for {name}"
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    assert norm > 0, f"{preset}: the loss does not depend on the head"
    with torch.no_grad():
        for name, p in head.named_parameters():
            p -= 1e-3 * grads[name] / norm  # a step of length 1e-3 down the gradient
        stepped, _ = loss_and_output()
    assert stepped < loss, f"{preset}: one step down the gradient did not lower the loss ({loss} -> {stepped})"
    # without a selection every query gets a mask, and the selected ones are the same masks
    head.eval()
    with torch.no_grad():
        everything = head(x["queries"], x["boxes"], [x["levels"][l] for l in head.levels], x["c1"]).mask_logits
        picked = head(x["queries"], x["boxes"], [x["levels"][l] for l in head.levels], x["c1"], select).mask_logits
    torch.testing.assert_close(everything[select.flatten()], picked, atol=1e-4, rtol=1e-4)


def test_blend_equals_hand_computation():
    torch.manual_seed(2)
    bases = torch.randn(1, 2, 4, 4)  # K = 2 bases at R = 4
    attn = torch.randn(1, 2, 2, 2)  # m = 2

    # bilinear 2 -> 4, align_corners=False: output i samples input at (i + 0.5) / 2 - 0.5
    def up(a):
        out = torch.zeros(4, 4)
        for i in range(4):
            for j in range(4):
                y = min(max((i + 0.5) / 2 - 0.5, 0), 1)
                x = min(max((j + 0.5) / 2 - 0.5, 0), 1)
                y0, x0 = int(y), int(x)
                y1, x1 = min(y0 + 1, 1), min(x0 + 1, 1)
                fy, fx = y - y0, x - x0
                out[i, j] = (
                    (1 - fy) * (1 - fx) * a[y0, x0]
                    + (1 - fy) * fx * a[y0, x1]
                    + fy * (1 - fx) * a[y1, x0]
                    + fy * fx * a[y1, x1]
                )
        return out

    u0, u1 = up(attn[0, 0]), up(attn[0, 1])
    w0 = u0.exp() / (u0.exp() + u1.exp())
    expected = w0 * bases[0, 0] + (1 - w0) * bases[0, 1]
    torch.testing.assert_close(blend(bases, attn)[0, 0], expected)


def test_uncertain_points_are_the_most_uncertain():
    # logits = |x - 0.3| * 20 - 1: zero on two thin bands; only points near them are uncertain
    xs = (torch.arange(64) + 0.5) / 64
    logits = ((xs - 0.3).abs() * 20 - 1).expand(64, 64)[None, None].repeat(3, 1, 1, 1)
    torch.manual_seed(0)
    points = uncertain_points(logits, num_points=50, oversample=100.0, importance=1.0)
    assert points.shape == (3, 50, 2)
    values = point_sample(logits, points)[:, 0].abs()
    assert values.max() < 0.1  # all chosen points sit on the zero crossings
    random_values = point_sample(logits, torch.rand(3, 50, 2))[:, 0].abs()
    assert random_values.mean() > 10 * values.mean()


def test_point_loss_matches_dense_loss_on_a_constant_target():
    logits = torch.full((2, 1, 16, 16), 0.7, requires_grad=True)
    targets = torch.ones(2, 16, 16)
    point = point_mask_losses(logits, targets, num_points=32, oversample=3.0, importance=0.75)
    torch.testing.assert_close(point["bce"], torch.nn.functional.softplus(torch.tensor(-0.7)))
    point["bce"].backward()
    assert logits.grad.abs().sum() > 0


def test_mask_iou_of_known_masks():
    target = torch.zeros(2, 4, 4)
    target[:, :2] = 1  # 8 pixels
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, :2] = 5  # exact
    logits[1, 0, :1] = 5  # 4 of 8
    torch.testing.assert_close(mask_iou(logits, target), torch.tensor([1.0, 0.5]))


def test_image_level_crop_is_roi_align_of_the_full_map():
    torch.manual_seed(3)
    maps = torch.randn(3, 2, 10, 12)
    boxes = torch.tensor([[0.0, 0, 40, 30], [5, 7, 20, 33], [-4, 2, 50, 60]])
    rois = torch.cat([torch.arange(3.0)[:, None], boxes], 1)
    torch.testing.assert_close(roi_align_map_per_box(maps, boxes, 8, 0.25, 2), roi_align(maps, rois, 8, 0.25, 2))


def test_box_dot_product_without_roi_features_is_the_same_as_with_them():
    """q . RoIAlign(F) computed as RoIAlign(q . F): same logits and gradients."""
    from mfcache.heads.dot import DotPredictor

    torch.manual_seed(4)
    fused = torch.randn(2, 6, 9, 11, requires_grad=True)
    queries = torch.randn(5, 6, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.0, 2, 30, 20], [1, -3, 4, 25, 41], [0, 10, 10, 12, 13], [1, 0, 0, 44, 36], [0, 5, 6, 7, 30]]
    )
    predictor = DotPredictor(channels=6, roi_size=8)
    direct = predictor(queries=queries, roi_features=roi_align(fused, rois, 8, 0.25, 2), fused=fused, rois=rois)
    linear = predictor(queries=queries, roi_features=None, fused=fused, rois=rois)
    torch.testing.assert_close(linear, direct, atol=1e-5, rtol=1e-4)
    weights = torch.randn_like(direct)
    grads = [torch.autograd.grad((out * weights).sum(), (fused, queries)) for out in (direct, linear)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_image_and_box_region_agree_up_to_sampling():
    x = tiny_batch()
    box = build_head(HeadConfig(region="box"), d_model=D, c1_channels=C1, num_levels=4)
    image = build_head(HeadConfig(region="image"), d_model=D, c1_channels=C1, num_levels=4)
    image.load_state_dict(box.state_dict())
    a = box(x["queries"], x["boxes"], x["levels"][:1], x["c1"]).mask_logits
    b = image(x["queries"], x["boxes"], x["levels"][:1], x["c1"]).mask_logits
    assert a.shape == b.shape
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9


@pytest.mark.parametrize(
    "override, message",
    [
        ({"encoder": "resnet"}, "`head.encoder` must be one of"),
        ({"query_encoder": ("box_cross_attn", "self_attn")}, "self_attn must come before"),
        ({"region": "image", "predictor": "fcn"}, "region = 'image'"),
        ({"neck": "conv_gn", "use_c1": False}, "needs head.use_c1"),
        ({"channels": 30, "query_encoder": ("ffn", "self_attn")}, "divisible by 4"),
        ({"scoring": "iou"}, "`head.scoring` must be one of"),
    ],
)
def test_bad_combinations_are_clear_errors(override, message):
    with pytest.raises(MfcacheError, match=message):
        build_head(HeadConfig(**override), d_model=D, c1_channels=C1, num_levels=4)


@pytest.mark.parametrize("name, value", [(name, value) for name, values in HEAD_CHOICES.items() for value in values])
def test_the_builder_builds_every_choice_the_config_declares(name, value):
    """HeadConfig's choices (config.HEAD_CHOICES) are the one table: each one builds a head that
    predicts finite masks of its RoI size, and a choice of the head's modules gives another head
    than the default (other modules or parameters, or other masks from the same weights' seed);
    ``loss``, ``point_targets`` and the scorings other than mask_iou act after the head and leave
    it as it is. A choice that shapes one part is built with that part present (both heads)."""
    context = {"encoder_activation": {"encoder": "deformable"}, "quality_head": {"scoring": "mask_iou"}}.get(name, {})
    config = HeadConfig(**{**context, name: (value,) if name == "query_encoder" else value})
    default = HeadConfig(**context)

    def built(config):
        torch.manual_seed(0)
        head = build_head(config, d_model=D, c1_channels=C1, num_levels=4).eval()
        x = tiny_batch()
        with torch.no_grad():
            logits = head(x["queries"], x["boxes"], [x["levels"][l] for l in head.levels], x["c1"]).mask_logits
        modules = (repr(head), sorted((n, tuple(p.shape)) for n, p in head.named_parameters()))
        return head, modules, logits

    head, modules, logits = built(config)
    m = value if name == "roi_size" else default.roi_size
    assert head.roi_size == m and logits.shape == (2 * 5, 1, m, m) and torch.isfinite(logits).all()
    _, default_modules, default_logits = built(default)
    same = modules == default_modules and torch.equal(logits, default_logits)
    if config == default or name in ("loss", "point_targets") or (name == "scoring" and value != "mask_iou"):
        assert same, f"head.{name}={value!r} changed the head"
    else:
        assert not same, f"head.{name}={value!r} built the default head"


def test_swin_shift_mask_and_window_padding():
    from mfcache.heads.swin import SwinEncoder

    torch.manual_seed(0)
    enc = SwinEncoder(dim=8, depth=2, window=3)
    x = torch.randn(1, 8, 7, 8)
    assert enc(x).shape == x.shape
    # a non-shifted block mixes nothing across windows: changing one window leaves another alone
    block = enc[0]
    y = x.clone()
    y[..., :3, :3] += 1
    diff = (block(y) - block(x)).abs().sum(1)[0]
    assert diff[:3, :3].sum() > 0 and diff[3:6, 3:6].sum() == 0 and math.isfinite(diff.sum().item())


# --- the paper's variants (issue 30): each option does what it says ---------------------------


def test_encoder_activation_gelu_swaps_the_deformable_ffns_activation():
    args = dict(d_model=D, c1_channels=C1, num_levels=4)
    torch.manual_seed(0)
    relu = build_head(HeadConfig(encoder="deformable", encoder_depth=2), **args)
    gelu = build_head(HeadConfig(encoder="deformable", encoder_depth=2, encoder_activation="gelu"), **args)
    gelu.load_state_dict(relu.state_dict())  # the same weights: only the activation differs
    for block_relu, block_gelu in zip(relu.fusion.encoder.blocks, gelu.fusion.encoder.blocks):
        assert isinstance(block_relu.ffn[1], torch.nn.ReLU) and isinstance(block_gelu.ffn[1], torch.nn.GELU)
    x = tiny_batch()
    a, b = (h(x["queries"], x["boxes"], x["levels"], x["c1"]).mask_logits for h in (relu, gelu))
    assert not torch.allclose(a, b, atol=1e-4)


def test_deformable_encoder_computes_the_kept_level_alone_with_the_same_values():
    from mfcache.heads.deformable import DeformableEncoder

    torch.manual_seed(0)
    encoder = DeformableEncoder(dim=D, num_levels=4, depth=2)
    levels = tiny_batch()["levels"]
    for keep in (0, 2):
        torch.testing.assert_close(encoder(levels, output_level=keep), encoder(levels)[keep], atol=1e-5, rtol=1e-5)


def test_box_encoder_without_the_query_token_encodes_the_roi_tokens_alone():
    from mfcache.heads.box_encoder import BoxEncoder

    torch.manual_seed(0)
    with_token = BoxEncoder(dim=D, depth=1)
    without = BoxEncoder(dim=D, depth=1, query_token=False)
    without.load_state_dict(with_token.state_dict())
    q, tokens = torch.randn(3, D), torch.randn(3, 10, D)
    q_out, t_out = without(q, tokens)
    assert q_out is q  # the query passes through untouched
    torch.testing.assert_close(t_out, with_token(None, tokens)[1])  # the layers on the tokens alone
    _, t_other = without(torch.randn(3, D), tokens)
    torch.testing.assert_close(t_other, t_out)  # ... whatever the query
    _, t_token = with_token(q, tokens)
    assert not torch.allclose(t_token, t_out, atol=1e-4)  # the token changes the encoded RoI
    head = build_head(
        HeadConfig(roi_size=16, box_encoder_depth=1, box_encoder_query=False), d_model=D, c1_channels=C1, num_levels=4
    )
    assert head.box_encoder.query_token is False


@pytest.mark.parametrize("roi_size", [16, 32, 64])
def test_mlp_quality_head_shapes(roi_size):
    from mfcache.heads.scoring import MaskIoUHead

    head = MaskIoUHead(channels=D, readout="mlp")
    out = head(torch.randn(5, D, roi_size, roi_size), torch.randn(5, 1, roi_size, roi_size))
    assert out.shape == (5,) and ((out > 0) & (out < 1)).all()
    built = build_head(
        HeadConfig(scoring="mask_iou", quality_head="mlp", roi_size=roi_size), d_model=D, c1_channels=C1, num_levels=4
    )
    assert isinstance(built.scorer.layers[-1], torch.nn.Linear) and len(built.scorer.layers) == 11


def test_mlp_quality_head_learns_where_the_mask_lies():
    """The flatten + MLP read-out keeps the layout: it learns a quality that depends on where the
    mask lies in the box (here: the share of the mask in the box's left half), which a global
    average pool of local features can hardly tell."""
    from mfcache.heads.scoring import MaskIoUHead

    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(64, 2, generator=gen)
    grid = (torch.arange(16) + 0.5) / 16
    blob = (
        (grid[None, None, :] - centres[:, 0, None, None]) ** 2 + (grid[None, :, None] - centres[:, 1, None, None]) ** 2
    ) < 0.06  # [64, y, x]
    logits = torch.where(blob, 4.0, -4.0)[:, None]
    target = blob[..., :8].flatten(1).sum(1) / blob.flatten(1).sum(1).clamp(min=1)
    features = torch.zeros(64, 1, 16, 16)

    def fit(readout: str) -> float:
        torch.manual_seed(0)
        head = MaskIoUHead(channels=1, hidden=8, readout=readout, mlp_hidden=64)
        optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(60):
            loss = torch.nn.functional.mse_loss(head(features, logits), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.item()

    mlp, pool = fit("mlp"), fit("pool")
    assert mlp < 0.1 * target.var().item(), (mlp, target.var().item())  # it learns
    assert mlp < 0.5 * pool, (mlp, pool)


def test_point_targets_are_read_at_the_cached_size():
    """A stripe 3 px wide in a 128 x 128 cached crop is 0.75 of a cell at M = 32: read at the
    cached size (point_targets = cache) the points that fall on it see 1, as PointRend reads
    the full-size GT; resized to M first (roi) no point can see more than 0.75."""
    from mfcache.ops.losses import image_generators, point_values

    target = torch.zeros(1, 128, 128, dtype=torch.bool)
    target[:, :, 61:64] = True
    logits = torch.zeros(1, 1, 32, 32)
    options = {"num_points": 2048, "oversample": 3.0, "importance": 0.0}
    _, cached = point_values(logits, target, **options, generators=image_generators([1], [7], seed=0, step=1))
    _, shrunk = point_values(
        logits, resize_targets(target, 32), **options, generators=image_generators([1], [7], seed=0, step=1)
    )
    assert (cached > 0.99).sum() >= 20  # ~2.3% of 2048 points land on the stripe
    assert shrunk.max() <= 0.76


def test_point_loss_option_picks_the_targets_resolution():
    """head_loss with point_targets = cache reads the crop at its stored size, = roi at M."""
    import dataclasses

    from mfcache.config import TrainConfig
    from mfcache.heads.base import HeadOutput
    from mfcache.ops.losses import head_loss, image_generators

    torch.manual_seed(0)
    target = torch.rand(2, 64, 64) > 0.5
    out = HeadOutput(torch.randn(2, 1, 32, 32))
    config = HeadConfig(loss="point", points=64)

    def loss(c, t):
        return head_loss(out, t, c, TrainConfig(), image_generators([2], [3], seed=0, step=1))[0]

    assert loss(config, target) == loss(config, target.float())
    roi = dataclasses.replace(config, point_targets="roi")
    torch.testing.assert_close(loss(roi, target), loss(config, resize_targets(target, 32)))
    assert not torch.equal(loss(roi, target), loss(config, target))


def test_mask_prob_score_on_the_pasted_mask_counts_the_image_pixels():
    """eval.mask_prob_at = image: the mean probability over the pasted mask's pixels > 0.5, so
    the part of a box outside the image counts for nothing (on the M x M grid it counts)."""
    from mfcache.ops.masks import paste_masks
    from mfcache.stages.postprocess import foreground_prob, pasted_foreground_prob

    prob = torch.full((1, 8, 8), 0.9)
    prob[:, :, 4:] = 0.6  # the right half, which lies outside the image
    boxes = torch.tensor([[20.0, 10.0, 60.0, 30.0]])  # x 20..60 in a 40 px wide image
    torch.testing.assert_close(foreground_prob(prob), torch.tensor([0.75]))
    pasted = pasted_foreground_prob(prob, boxes, (50, 40))
    torch.testing.assert_close(pasted, foreground_prob(paste_masks(prob, boxes, (50, 40), threshold=None)))
    assert pasted.item() > 0.82  # the 0.9 half, and the band blended towards the 0.6 half at the image's edge
    inside = torch.tensor([[0.0, 0.0, 40.0, 40.0]])  # a box filling the image: about the grid's value
    torch.testing.assert_close(pasted_foreground_prob(prob, inside, (40, 40)), foreground_prob(prob), atol=0.02, rtol=0)
    several = torch.cat([prob, prob.flip(-1), prob])  # pasted a few at a time: the same per mask
    torch.testing.assert_close(
        pasted_foreground_prob(several, boxes.expand(3, 4), (50, 40), chunk_pixels=1),
        pasted_foreground_prob(several, boxes.expand(3, 4), (50, 40)),
    )
