"""Backbones of the DETR lineage, keys ``backbone.0.body.*``: torchvision's ResNet with
frozen BatchNorm (conv1, bn1, layer1..layer4; no fc) here, Swin in :mod:`.swin`.

forward(pixels [B, 3, H, W]) -> (c1 [B, C1, H/4, W/4] = first-stage output,
[the maps of ``return_layers`` (1..4 = stages), finest first]); attributes ``num_channels``,
``strides`` (of the returned maps) and ``c1_channels``; ``c1_stem()`` is the module that makes
c1 alone (``--c1 recompute``), sharing the body's weights.
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from mfcache.errors import MfcacheError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def build_backbone(name: str, return_layers: tuple[int, ...], *, window: int = 0, dilation: bool = False) -> nn.Module:
    """A ResNet (``resnet50`` ...) or Swin (``swin_tiny`` / ``small`` / ``base`` / ``large``) backbone
    body; ``window`` (Swin only; 0 = the size's default) and ``dilation`` (ResNet only: DC5)."""
    from mfcache.detectors.native.swin import SWINS, SwinBody

    if name in SWINS:
        if dilation:
            raise MfcacheError(f"dilation applies to ResNet backbones, not {name}")
        return SwinBody(name, return_layers, window)
    if name in RESNETS:
        if window:
            raise MfcacheError(f"window applies to Swin backbones, not {name}")
        if dilation and name in ("resnet18", "resnet34"):
            raise MfcacheError(f"dilation needs a bottleneck ResNet (resnet50, resnet101), not {name}")
        return ResNetBody(name, return_layers, dilation)
    raise MfcacheError(f"backbone {name!r} is not supported; choose one of {', '.join(RESNETS + tuple(SWINS))}")


class ResNetBody(nn.Module):
    """Holds ``body`` (the ResNet trunk) so parameter names read ``backbone.0.body.*``.
    ``dilation``: layer4 dilated instead of strided (DC5), so it stays at stride 16."""

    def __init__(self, name: str, return_layers: tuple[int, ...], dilation: bool = False):
        super().__init__()
        body = getattr(torchvision.models, name)(
            weights=None, norm_layer=FrozenBatchNorm2d, replace_stride_with_dilation=[False, False, dilation]
        )
        del body.fc, body.avgpool
        self.body = body
        self.return_layers = return_layers  # 1..4 = layer1..layer4
        widths = (64, 128, 256, 512) if name in ("resnet18", "resnet34") else (256, 512, 1024, 2048)
        self.num_channels = [widths[i - 1] for i in return_layers]
        self.c1_channels = widths[0]
        self.strides = [2 ** (min(i, 3 if dilation else 4) + 1) for i in return_layers]

    def c1_stem(self) -> nn.Module:
        """``[B, 3, H, W]`` -> ``[B, C1, H/4, W/4]``: conv1, bn1, relu, maxpool, layer1 (the body's own modules)."""
        b = self.body
        return nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool, b.layer1).eval()

    def forward(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(pixels))))
        maps = []
        for i in range(1, 5):
            x = getattr(b, f"layer{i}")(x)
            maps.append(x)
        return maps[0], [maps[i - 1] for i in self.return_layers]
