"""Padded detector input batches for the adapter tests."""

import torch


def padded_batch(sizes, pad, *, fill=torch.randn, seed=0):
    """``sizes [(h, w), ...]`` -> ``pixel_values [B, 3, H, W]`` (each image ``fill``-ed with
    values from a generator seeded with ``seed``, zero padding) and ``pixel_mask [B, H, W]``
    bool, with ``H, W`` the largest size rounded up to a multiple of ``pad``."""
    gen = torch.Generator().manual_seed(seed)
    height, width = (-(-max(s[i] for s in sizes) // pad) * pad for i in (0, 1))
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = fill(3, h, w, generator=gen)
        pixel_mask[i, :h, :w] = True
    return pixel_values, pixel_mask
