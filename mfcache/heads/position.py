"""Fixed 2-D sine position embeddings (DETR's), for attention over feature maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position(height: int, width: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``[height * width, dim]`` row-major: half the channels encode y, half x, each as
    sin/cos pairs of the normalised pixel-centre coordinate at geometric frequencies."""
    quarter = dim // 4
    freq = 10000.0 ** (-torch.arange(quarter, device=device, dtype=dtype) / max(quarter, 1))
    y = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height * 2 * math.pi
    x = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width * 2 * math.pi
    ey = torch.cat([(y[:, None] * freq).sin(), (y[:, None] * freq).cos()], -1)  # [H, dim/2]
    ex = torch.cat([(x[:, None] * freq).sin(), (x[:, None] * freq).cos()], -1)  # [W, dim/2]
    pos = torch.cat([ey[:, None].expand(-1, width, -1), ex[None].expand(height, -1, -1)], -1)
    pos = pos.reshape(height * width, -1)
    return torch.nn.functional.pad(pos, (0, dim - pos.shape[-1]))
