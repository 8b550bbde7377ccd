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
    """Decode any PIL-readable file to ``uint8 [3, H, W]`` RGB (see :func:`pil_to_image`)."""
    return load_image_alpha(path, alpha=False)[0]


def load_image_alpha(path: str | Path, *, alpha: bool = True) -> tuple[Tensor, Tensor | None]:
    """Decode a file to ``uint8 [3, H, W]`` RGB, the same pixels as :func:`load_image`, and,
    with ``alpha``, its alpha channel ``uint8 [H, W]`` (None for an image without
    transparency: no alpha band, no transparent palette entry or colour).

    The file's image is transposed in place (no copy) and converted only when it is not RGB
    already, so decoding holds about three copies of the pixels at its peak (PIL's, one
    array, the tensor) rather than six.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)  # our own image: no copy
            return _rgb(img), (_alpha(img) if alpha else None)
    except FileNotFoundError:
        raise MfcacheError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MfcacheError(f"cannot decode image {path}: {exc}") from None


def pil_to_image(img: Image.Image) -> Tensor:
    """A PIL image -> ``uint8 [3, H, W]`` RGB.

    Grayscale, palette and RGBA images become RGB (alpha dropped); 16-bit images are
    scaled to 8 bits; EXIF orientation is applied, as COCO's width/height assume.
    """
    return _rgb(ImageOps.exif_transpose(img))  # a copy: the caller's image is left as it is


def _rgb(img: Image.Image) -> Tensor:
    """An upright PIL image (any mode) -> ``uint8 [3, H, W]`` RGB (:func:`pil_to_image`)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        arr = np.repeat(arr[..., None], 3, axis=2)
    else:
        arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    out = torch.empty(3, *arr.shape[:2], dtype=torch.uint8)
    out.numpy()[...] = arr.transpose(2, 0, 1)  # straight into channels-first: one copy
    return out


def _alpha(img: Image.Image) -> Tensor | None:
    """The alpha channel ``uint8 [H, W]`` of an upright PIL image, None without transparency."""
    if not img.has_transparency_data:
        return None
    band = img if "A" in img.getbands() else img.convert("RGBA")
    return torch.from_numpy(np.array(band.getchannel("A"), dtype=np.uint8))


def to_image(image: str | Path | Image.Image | np.ndarray | Tensor) -> Tensor:
    """Any one image -> ``uint8 [3, H, W]`` RGB: a file path (:func:`load_image`), a PIL image
    (:func:`pil_to_image`), a numpy array ``[H, W, C]`` or ``[H, W]`` (channels last, as
    PIL, OpenCV and imageio give them; RGB order) or a tensor ``[C, H, W]`` or ``[H, W]``
    (channels first, as torchvision gives them). Arrays and tensors are ``uint8``, or float in
    [0, 1] (scaled by 255 and rounded); C is 1 (gray), 3 (RGB) or 4 (RGBA, alpha dropped)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_image(image)
    if isinstance(image, np.ndarray):
        shape = image.shape
        if image.ndim == 3:
            image = np.moveaxis(image, -1, 0)
        return _pixels(torch.from_numpy(np.ascontiguousarray(image)), "a numpy array [H, W, C]", shape)
    if isinstance(image, Tensor):
        return _pixels(image.detach().cpu(), "a tensor [C, H, W]", image.shape)
    raise MfcacheError(
        f"cannot read an image from {type(image).__name__!r}: give a path, a PIL image, "
        "a numpy array [H, W, C] or a tensor [C, H, W]"
    )


def _pixels(x: Tensor, form: str, shape: tuple[int, ...]) -> Tensor:
    """A channels-first ``[C, H, W]`` or ``[H, W]`` tensor -> ``uint8 [3, H, W]`` (``form`` and
    the ``shape`` as given name it in errors)."""
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3, 4) or 0 in x.shape:
        raise MfcacheError(
            f"an image must be {form} with 1, 3 or 4 channels (or [H, W] gray); got shape {tuple(shape)}"
        )
    if x.dtype.is_floating_point:
        if x.numel() and not (0.0 <= float(x.min()) and float(x.max()) <= 1.0):
            raise MfcacheError(
                f"a float image must hold values in [0, 1]; got [{float(x.min()):g}, "
                f"{float(x.max()):g}] (give uint8 for 0..255)"
            )
        x = (x * 255.0).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise MfcacheError(f"an image must be uint8 or float in [0, 1], got {x.dtype}")
    x = x[:3] if x.shape[0] == 4 else x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return x.contiguous()


def to_input(image: Tensor, preprocess: Preprocess) -> Tensor:
    """``uint8 [3, H, W]`` -> normalised ``float32 [3, h_in, w_in]`` (h_in, w_in from the resize
    rule), on the path ``preprocess.resize`` names (:class:`~mfcache.detectors.base.Preprocess`)."""
    size = preprocess.input_size(image.shape[1], image.shape[2])
    if preprocess.resize == "processor":
        return _processor_input(image, size, preprocess)
    if preprocess.resize in ("float", "float-noaa"):
        return _float_input(image, size, preprocess, antialias=preprocess.resize == "float")
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


def _float_input(image: Tensor, size: tuple[int, int], preprocess: Preprocess, *, antialias: bool) -> Tensor:
    """Rescale first, then resize the float image (bilinear, antialiased unless RF-DETR's
    processor is followed; never rounded)."""
    x = image.float().div_(1.0 / preprocess.rescale_factor)[None]
    if size != tuple(image.shape[1:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
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
