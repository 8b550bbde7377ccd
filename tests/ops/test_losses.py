"""Mask losses: their values on known answers, target resizing, per-image point draws."""

import torch

from mfcache.ops.losses import mask_losses, resize_targets


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


def test_point_loss_draws_each_images_points_from_its_own_generator():
    """An image's sampled points depend on (seed, step, image id) alone: its loss in a batch is
    its share of the batch's loss computed alone, whoever its batch mates are (or its rank)."""
    from mfcache.ops.losses import image_generators, point_mask_losses

    torch.manual_seed(0)
    logits, targets = torch.randn(5, 1, 16, 16), torch.rand(5, 16, 16)
    options = {"num_points": 32, "oversample": 3.0, "importance": 0.75}
    together = point_mask_losses(
        logits, targets, **options, generators=image_generators([2, 3], [11, 12], seed=0, step=4)
    )
    first = point_mask_losses(
        logits[:2], targets[:2], **options, generators=image_generators([2], [11], seed=0, step=4)
    )
    second = point_mask_losses(
        logits[2:], targets[2:], **options, generators=image_generators([3], [12], seed=0, step=4)
    )
    for key in ("bce", "dice"):
        torch.testing.assert_close(together[key], (2 * first[key] + 3 * second[key]) / 5)
    other_step = point_mask_losses(
        logits[2:], targets[2:], **options, generators=image_generators([3], [12], seed=0, step=5)
    )
    assert not torch.equal(other_step["bce"], second["bce"])  # a new draw every step
