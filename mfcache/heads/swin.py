"""Swin Transformer blocks (window attention, shifted on every second block, relative
position bias) as an image feature encoder on one map of E (the stride-8 level)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WindowAttention(nn.Module):
    """``[W_n, S*S, C]`` tokens of W_n windows of side S -> same shape, with a learned
    relative position bias and an optional additive ``mask [W_n, S*S, S*S]``."""

    def __init__(self, *, dim: int, window: int, heads: int = 4):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + window - 1  # [2, S*S, S*S]
        self.register_buffer("bias_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[self.bias_index].permute(2, 0, 1)[None]  # [1, heads, T, T]
        if mask is not None:
            bias = bias + mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on ``[B, C, H, W]`` (padded to whole windows, cropped back)."""

    def __init__(self, *, dim: int, window: int, shift: bool):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, window=window)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = self.window
        tokens = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        y = F.pad(self.norm1(tokens), (0, 0, 0, -w % s, 0, -h % s))
        hp, wp = y.shape[1:3]
        shift = s // 2 if self.shift and min(hp, wp) > s else 0
        if shift:
            y = y.roll((-shift, -shift), (1, 2))
        windows = y.view(b, hp // s, s, wp // s, s, c).transpose(2, 3).reshape(-1, s * s, c)
        mask = _shift_mask(hp, wp, s, shift, x.device).repeat(b, 1, 1) if shift else None
        y = self.attn(windows, mask).view(b, hp // s, wp // s, s, s, c).transpose(2, 3).reshape(b, hp, wp, c)
        if shift:
            y = y.roll((shift, shift), (1, 2))
        tokens = tokens + y[:, :h, :w]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.permute(0, 3, 1, 2)


def _shift_mask(h: int, w: int, s: int, shift: int, device) -> Tensor:
    """``[windows, S*S, S*S]`` additive mask: after the cyclic shift, tokens from regions
    that were not adjacent before it must not attend to each other."""
    region = torch.zeros(h, w, device=device)
    bounds = (slice(0, -s), slice(-s, -shift), slice(-shift, None))
    for i, ys in enumerate(bounds):
        for j, xs in enumerate(bounds):
            region[ys, xs] = 3 * i + j
    region = region.view(h // s, s, w // s, s).transpose(1, 2).reshape(-1, s * s)
    different = region[:, :, None] != region[:, None, :]
    return different.float() * -1e4


class SwinEncoder(nn.Sequential):
    """``depth`` Swin blocks, every second one shifted; ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, *, dim: int, depth: int, window: int = 7):
        super().__init__(*(SwinBlock(dim=dim, window=window, shift=i % 2 == 1) for i in range(depth)))
