"""Images in, detector input out: decoding, resizing, normalising and batch padding.

Conventions: an image is a ``uint8 [3, H, W]`` RGB tensor in its *displayed* orientation
(EXIF rotation applied); detector input is ``float [3, h_in, w_in]`` normalised with the
detector's mean/std, on the pixel path ``Preprocess.resize`` names (by default the same
pixels as the checkpoint's own transformers image processor); a batch is zero-padded to a
multiple of ``Preprocess.pad_divisor`` (and to at least ``Preprocess.pad_size``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import functional as tvF

from mfcache.detectors.base import RESIZE_PATHS, Preprocess
from mfcache.errors import MfcacheError


def load_image(path: str | Path) -> Tensor:
    """Decode any PIL-readable file to ``uint8 [3, H, W]`` RGB.

    Grayscale, palette and RGBA images become RGB (alpha dropped); 16-bit images are
    scaled to 8 bits; EXIF orientation is applied, as COCO's width/height assume.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
                arr = np.repeat(arr[..., None], 3, axis=2)
            else:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise MfcacheError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MfcacheError(f"cannot decode image {path}: {exc}") from None
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()


def to_input(image: Tensor, preprocess: Preprocess) -> Tensor:
    """``uint8 [3, H, W]`` -> normalised ``float32 [3, h_in, w_in]`` (h_in, w_in from the resize
    rule), on the path ``preprocess.resize`` names (:class:`~mfcache.detectors.base.Preprocess`)."""
    size = preprocess.input_size(image.shape[1], image.shape[2])
    if preprocess.resize == "processor":
        return _processor_input(image, size, preprocess)
    if preprocess.resize == "float":
        return _float_input(image, size, preprocess)
    raise MfcacheError(f"unknown resize path {preprocess.resize!r}; choose one of {', '.join(RESIZE_PATHS)}")


def _processor_input(image: Tensor, size: tuple[int, int], preprocess: Preprocess) -> Tensor:
    """transformers' image processors, step for step (torchvision backend): bilinear
    antialiased resize of the ``uint8`` image (torchvision's uint8 kernel, rounded back to
    ``uint8``), then rescale and normalise fused into ``(x - mean / r) / (std / r)`` in
    float32, or ``x * r`` alone for processors that do not normalise (mean 0, std 1)."""
    if size != tuple(image.shape[1:]):
        image = tvF.resize(image, list(size), interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
    scale = preprocess.rescale_factor
    if preprocess.mean == (0.0, 0.0, 0.0) and preprocess.std == (1.0, 1.0, 1.0):
        return image * scale
    mean = (torch.tensor(preprocess.mean) * (1.0 / scale)).view(3, 1, 1)
    std = (torch.tensor(preprocess.std) * (1.0 / scale)).view(3, 1, 1)
    return image.to(torch.float32).sub_(mean).div_(std)


def _float_input(image: Tensor, size: tuple[int, int], preprocess: Preprocess) -> Tensor:
    """Rescale first, then resize the float image (bilinear, antialiased; never rounded)."""
    x = image.float().div_(1.0 / preprocess.rescale_factor)[None]
    if size != tuple(image.shape[1:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def pad_batch(inputs: list[Tensor], preprocess: Preprocess) -> tuple[Tensor, Tensor]:
    """Zero-pad ``[3, h_i, w_i]`` inputs to one ``[B, 3, H, W]`` batch, H and W at least
    ``preprocess.pad_size`` (if set) and multiples of ``preprocess.pad_divisor``; returns it
    with ``pixel_mask [B, H, W]`` (True on real pixels)."""
    divisor, canvas = preprocess.pad_divisor, preprocess.pad_size or (0, 0)
    height = max(canvas[0], *(x.shape[1] for x in inputs))
    width = max(canvas[1], *(x.shape[2] for x in inputs))
    height = -(-height // divisor) * divisor
    width = -(-width // divisor) * divisor
    batch = inputs[0].new_zeros(len(inputs), 3, height, width)
    mask = torch.zeros(len(inputs), height, width, dtype=torch.bool)
    for i, x in enumerate(inputs):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
        mask[i, : x.shape[1], : x.shape[2]] = True
    return batch, mask
