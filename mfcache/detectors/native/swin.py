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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> (embed_dim, depths, heads, default window). The window is a separate choice: H-DETR's
# Swin-L (``swin_large``, ImageNet-22k 224) uses 7, DINO's (``swin_L_384_22k``) 12; a checkpoint
# tells which (:mod:`.architecture`), the default serves models built without one.
SWINS = {
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


def window_of(table_rows: int) -> int | None:
    """The window ``w`` whose relative-position bias table has ``(2w - 1)^2`` rows, or None."""
    side = math.isqrt(table_rows)
    return (side + 1) // 2 if side * side == table_rows and side % 2 == 1 else None


def _windows(x: Tensor, size: int) -> Tensor:
    """[B, H, W, C] -> [B * nW, size * size, C] (row-major windows)."""
    b, h, w, c = x.shape
    x = x.view(b, h // size, size, w // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // size) * (w // size), size * size, c)


def _unwindows(x: Tensor, size: int, b: int, h: int, w: int) -> Tensor:
    c = x.shape[-1]
    x = x.view(b, h // size, w // size, size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_mask(hp: int, wp: int, size: int, shift: int, device: torch.device) -> Tensor:
    """[nW, N, N] additive mask (0 / -100) keeping shifted windows from mixing regions: the
    rows (and columns) before ``-size``, from ``-size`` to ``-shift``, and the last ``shift``
    are three regions (computed, not sliced, so it exports with dynamic sizes)."""
    rows, cols = torch.arange(hp, device=device), torch.arange(wp, device=device)
    row_part = (rows >= hp - size).long() + (rows >= hp - shift).long()
    col_part = (cols >= wp - size).long() + (cols >= wp - shift).long()
    region = (3 * row_part[:, None] + col_part[None, :]).float()[None, :, :, None]
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
        h, w = x.shape[1:3]
        hp, wp = _ceil_to(h, self.size), _ceil_to(w, self.size)
        y = self._attend(F.pad(self.norm1(x), (0, 0, 0, wp - w, 0, hp - h)), mask)
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))

    def forward_padded(self, x: Tensor, keep: Tensor, mask: Tensor) -> Tensor:
        """The same on a map already padded to whole windows: ``x [B, Hp, Wp, C]``, ``keep [Hp, Wp]``
        True on the real tokens; the padding is zeroed where :meth:`forward` pads with zeros, so the
        real tokens come out as there (the padding carries values that never reach them)."""
        y = self._attend(torch.where(keep[..., None], self.norm1(x), 0), mask)
        x = x + y
        return x + self.mlp(self.norm2(x))

    def _attend(self, y: Tensor, mask: Tensor) -> Tensor:
        """(Shifted) window attention on ``y [B, Hp, Wp, C]`` padded to whole windows."""
        b, hp, wp = y.shape[:3]
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = _unwindows(self.attn(_windows(y, self.size), mask if self.shift else None), self.size, b, hp, wp)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        return y


def _ceil_to(n: int, size: int) -> int:
    """``n`` rounded up to a multiple of ``size`` (written so torch.export sees the multiple)."""
    return -(-n // size) * size


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
        x = run_blocks(self.blocks, x, self.size)
        return x, (self.downsample(x) if self.downsample is not None else x)


def run_blocks(blocks: nn.ModuleList, x: Tensor, size: int) -> Tensor:
    """A stage's blocks on ``x [B, H, W, C]`` (window ``size``; shifted blocks share one mask)."""
    mask = shift_mask(_ceil_to(x.shape[1], size), _ceil_to(x.shape[2], size), size, size // 2, x.device).to(x.dtype)
    for block in blocks:
        x = block(x, mask)
    return x


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, ceil(H/4), ceil(W/4), C]."""
        h, w = x.shape[2:]
        x = F.pad(x, (0, -(-w // 4) * 4 - w, 0, -(-h // 4) * 4 - h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinC1Stem(nn.Module):
    """``[B, 3, H, W]`` -> c1 ``[B, C, H/4, W/4]``: the patch embedding and stage 0's blocks (the
    trunk's own modules; stage 0's patch merging is left out), the c1 of :class:`SwinBody`.

    Written for ``torch.export`` with dynamic sizes: the map is padded to whole windows once
    and cropped once, by gathers rather than slices, and the blocks run on the padded map
    (:meth:`SwinBlock.forward_padded`): a per-block pad and crop needs facts about
    ``ceil(ceil(H / 4) / window)`` that export cannot prove. Inputs have sides of at least
    ``min_side`` pixels (two windows of tokens): the exported program is made for those."""

    def __init__(self, trunk: SwinTrunk):
        super().__init__()
        self.patch_embed, self.blocks, self.size = trunk.patch_embed, trunk.layers[0].blocks, trunk.layers[0].size
        self.min_side = 4 * self.size + 1

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels)
        h, w = x.shape[1:3]
        hp, wp = _ceil_to(h, self.size), _ceil_to(w, self.size)
        rows, cols = torch.arange(hp, device=x.device), torch.arange(wp, device=x.device)
        # index h (w) is the zero row (column) F.pad appends: every padded position reads it
        x = F.pad(x, (0, 0, 0, 1, 0, 1)).index_select(1, rows.clamp(max=h)).index_select(2, cols.clamp(max=w))
        keep = (rows[:, None] < h) & (cols[None, :] < w)
        mask = shift_mask(hp, wp, self.size, self.size // 2, x.device).to(x.dtype)
        for block in self.blocks:
            x = block.forward_padded(x, keep, mask)
        x = x.index_select(1, torch.arange(h, device=x.device)).index_select(2, torch.arange(w, device=x.device))
        return x.permute(0, 3, 1, 2)


class SwinTrunk(nn.Module):
    def __init__(self, name: str, out_indices: tuple[int, ...], window: int = 0):
        super().__init__()
        dim, depths, heads, default = SWINS[name]
        size = window or default
        self.out_indices = out_indices
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.ModuleList(
            SwinStage(dim * 2**i, d, h, size, i < 3) for i, (d, h) in enumerate(zip(depths, heads))
        )
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dim * 2**i))


class SwinBody(nn.Module):
    """Holds ``body`` so names read ``backbone.0.body.*``; same interface as ResNetBody.
    ``window`` 0 is the size's default window (:data:`SWINS`)."""

    def __init__(self, name: str, return_layers: tuple[int, ...], window: int = 0):
        super().__init__()
        dim = SWINS[name][0]
        self.body = SwinTrunk(name, tuple(i - 1 for i in return_layers), window)
        self.window = self.body.layers[0].size
        self.return_layers = return_layers  # 1..4 = stages 0..3, as ResNet's layer1..layer4
        self.num_channels = [dim * 2 ** (i - 1) for i in return_layers]
        self.c1_channels = dim
        self.strides = [2 ** (i + 1) for i in return_layers]

    def c1_stem(self) -> nn.Module:
        """The module that makes c1 alone (``--c1 recompute``): :class:`SwinC1Stem`."""
        return SwinC1Stem(self.body).eval()

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
