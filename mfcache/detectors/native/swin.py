"""Swin Transformer backbone as the detection repos ship it (Swin-Transformer-Object-Detection
lineage, used by H-DETR and DINO), keys under ``backbone.0.body``:
``patch_embed.{proj, norm}``, ``layers.S.blocks.B.{norm1, attn.{relative_position_bias_table,
relative_position_index, qkv, proj}, norm2, mlp.{fc1, fc2}}``, ``layers.S.downsample.{reduction,
norm}``, and ``norm{S}`` for every returned stage. (DINO's checkpoints omit ``body``; the
checkpoint key table adds it.)

forward(pixels [B, 3, H, W]) -> (c1 = stage-0 output [B, C, H/4, W/4] (no norm: the
originals return no stage 0, so it has none), [normed outputs of ``return_layers``]).
Maps are padded to multiples of the window inside each block and cropped back, shifted
blocks use the originals' -100 attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> (embed_dim, depths, heads, window)
SWINS = {
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


def _windows(x: Tensor, size: int) -> Tensor:
    """[B, H, W, C] -> [B * nW, size * size, C] (row-major windows)."""
    b, h, w, c = x.shape
    x = x.view(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, c)


def _unwindows(x: Tensor, size: int, b: int, h: int, w: int) -> Tensor:
    x = x.view(b, h // size, w // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


def shift_mask(hp: int, wp: int, size: int, shift: int, device: torch.device) -> Tensor:
    """[nW, N, N] additive mask (0 / -100) keeping shifted windows from mixing regions."""
    region = torch.zeros(1, hp, wp, 1, device=device)
    cuts = (slice(0, -size), slice(-size, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            region[:, hs, ws, :] = 3 * i + j
    ids = _windows(region, size)[..., 0]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, size: int):
        super().__init__()
        self.heads, self.size = heads, size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * size - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (size - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * size - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x [B*nW, N, C], mask [nW, N, N] or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            attn = (attn.view(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, size: int, shift: int):
        super().__init__()
        self.size, self.shift = size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, H, W, C]; ``mask`` is used by shifted blocks only."""
        b, h, w, c = x.shape
        s = self.size
        y = F.pad(self.norm1(x), (0, 0, 0, (s - w % s) % s, 0, (s - h % s) % s))
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = _unwindows(self.attn(_windows(y, s), mask if self.shift else None), s, b, hp, wp)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, size: int, downsample: bool):
        super().__init__()
        self.size = size
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, size, 0 if i % 2 == 0 else size // 2) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (stage output [B, H, W, C], input of the next stage)."""
        s = self.size
        mask = shift_mask(-(-x.shape[1] // s) * s, -(-x.shape[2] // s) * s, s, s // 2, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, ceil(H/4), ceil(W/4), C]."""
        x = F.pad(x, (0, (4 - x.shape[3] % 4) % 4, 0, (4 - x.shape[2] % 4) % 4))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTrunk(nn.Module):
    def __init__(self, name: str, out_indices: tuple[int, ...]):
        super().__init__()
        dim, depths, heads, size = SWINS[name]
        self.out_indices = out_indices
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.ModuleList(SwinStage(dim * 2 ** i, d, h, size, i < 3)
                                    for i, (d, h) in enumerate(zip(depths, heads)))
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dim * 2 ** i))


class SwinBody(nn.Module):
    """Holds ``body`` so names read ``backbone.0.body.*``; same interface as ResNetBody."""

    def __init__(self, name: str, return_layers: tuple[int, ...]):
        super().__init__()
        dim = SWINS[name][0]
        self.body = SwinTrunk(name, tuple(i - 1 for i in return_layers))
        self.return_layers = return_layers  # 1..4 = stages 0..3, as ResNet's layer1..layer4
        self.num_channels = [dim * 2 ** (i - 1) for i in return_layers]
        self.c1_channels = dim
        self.strides = [2 ** (i + 1) for i in return_layers]

    def forward(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        t = self.body
        x = t.patch_embed(pixels)
        outs, c1 = [], None
        for i, stage in enumerate(t.layers):
            out, x = stage(x)
            if i == 0:
                c1 = out.permute(0, 3, 1, 2)
            if i in t.out_indices:
                outs.append(getattr(t, f"norm{i}")(out).permute(0, 3, 1, 2))
        return c1, outs
