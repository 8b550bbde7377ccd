"""Decoding image files: the pixels every stage sees (unchanged by the leaner decoder), the
alpha channel overlays keep, and overlays built from masks given a chunk at a time."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mfcache.data.transforms import load_image, load_image_alpha, pil_to_image
from mfcache.stages.visualize import instance_map, overlay, overlay_map, palette


def _reference(path) -> np.ndarray:
    """What decoding gave before: a transposed copy converted to RGB, channels first."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB")).transpose(2, 0, 1)


def _files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8))
    files = {}
    rgb.save(files.setdefault("rgb", tmp_path / "rgb.png"))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    rgba.save(files.setdefault("rgba", tmp_path / "rgba.png"))
    gray_alpha = rgb.convert("L")
    gray_alpha.putalpha(alpha)
    gray_alpha.save(files.setdefault("la", tmp_path / "la.png"))
    palette_image = rgb.quantize(16)
    palette_image.save(files.setdefault("p_transparent", tmp_path / "p.png"), transparency=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 53 x 37
    rgb.save(files.setdefault("jpeg_rotated", tmp_path / "rot.jpg"), exif=exif, quality=90)
    return files, alpha, palette_image


def test_decoding_gives_the_same_pixels_and_the_alpha_channel(tmp_path):
    files, alpha, palette_image = _files(tmp_path)
    for kind, path in files.items():
        pixels, band = load_image_alpha(path)
        assert pixels.dtype == torch.uint8 and pixels.is_contiguous(), kind
        assert np.array_equal(pixels.numpy(), _reference(path)), kind
        assert torch.equal(load_image(path), pixels), kind
        expected = {
            "rgba": np.asarray(alpha),
            "la": np.asarray(alpha),
            "p_transparent": (np.asarray(palette_image) != 3).astype(np.uint8) * 255,
        }.get(kind)
        if expected is None:
            assert band is None, kind
        else:
            assert band.dtype == torch.uint8 and np.array_equal(band.numpy(), expected), kind
    assert load_image_alpha(files["rgba"], alpha=False)[1] is None
    assert tuple(load_image(files["jpeg_rotated"]).shape) == (3, 53, 37)


def test_a_callers_pil_image_is_left_as_it_was(tmp_path):
    files, _, _ = _files(tmp_path)
    with Image.open(files["jpeg_rotated"]) as img:
        img.load()
        before = (img.size, img.getexif().get(0x0112))
        assert tuple(pil_to_image(img).shape) == (3, 53, 37)
        assert (img.size, img.getexif().get(0x0112)) == before


def test_an_overlay_keeps_the_inputs_alpha_exactly():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    alpha = torch.randint(0, 256, (20, 30), dtype=torch.uint8)
    masks = torch.zeros(1, 20, 30, dtype=torch.bool)
    masks[0, 5:15, 5:20] = True
    picture = overlay(image, masks, torch.tensor([[5.0, 5, 20, 15]]), ["a"], torch.tensor([0.9]), image_alpha=alpha)
    plain = overlay(image, masks, torch.tensor([[5.0, 5, 20, 15]]), ["a"], torch.tensor([0.9]))
    assert picture.mode == "RGBA" and plain.mode == "RGB"
    assert np.array_equal(np.asarray(picture.getchannel("A")), alpha.numpy())
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(plain))


@pytest.mark.parametrize("per_chunk", [1, 2, 5])
def test_an_overlay_from_chunks_equals_one_from_all_masks(per_chunk):
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g)
    masks = torch.rand(5, 40, 50, generator=g) > 0.7
    boxes = torch.tensor([[2.0, 3, 30, 35], [10, 1, 49, 20], [0, 0, 50, 40], [5, 5, 6, 6], [20, 10, 45, 39]])
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7])
    names = [f"c{i}" for i in range(5)]
    order = torch.argsort(scores, stable=True)
    top = instance_map(masks[order].split(per_chunk), (40, 50))
    texts = [f"{names[i]} {float(scores[i]):.2f}" for i in order.tolist()]
    chunked = overlay_map(image, top, boxes[order], palette(5)[order.numpy()], texts)
    assert np.array_equal(np.asarray(chunked), np.asarray(overlay(image, masks, boxes, names, scores)))
    buffer = io.BytesIO()
    chunked.save(buffer, format="PNG")  # a plain RGB picture
    assert Image.open(buffer).mode == "RGB"
