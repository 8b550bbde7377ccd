"""``--c1 recompute``: C1 is not stored but re-made from the image at training time.

At a COCO scale a stored stride-4 map costs ~28 MiB per image (~3.5 TB for train2017). With
``recompute``, extraction exports the detector's frozen stem + first stage with
``torch.export`` (dynamic batch and image size) into the cache's root array ``c1_stem``
(the program's bytes); the training
data loader decodes the image, preprocesses it as the detector did, and runs that small
program. Nothing else of the detector is loaded.

The stored program is code: ``torch.export.load`` unpickles parts of the archive with the
full unpickler (pickled weights and constants, the legacy format's fallback), resolves node
targets by name from ``torch``, and parses and compiles expressions and guards stored in it.
So a cache passed on by someone else could run anything through it; mfcache loads it only
if this user's own extraction exported exactly these bytes (a record kept outside the cache,
:func:`mfcache.checkpoint_io.exported_here`) or where the caller trusts the files it reads
(:func:`mfcache.checkpoint_io.trusting`, the CLI's ``--trust-checkpoint``), and says so
before any work starts.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr
from torch import Tensor, nn
from torch.export import Dim
from zarr.codecs import BloscCodec

from mfcache.cache.location import locate
from mfcache.cache.schema import c1_size, checksum
from mfcache.checkpoint_io import exported_here, files_trusted, remember_exported
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.detectors.base import Preprocess
from mfcache.errors import MfcacheError, UntrustedFile

if TYPE_CHECKING:
    from mfcache.detectors.base import Detector

STEM_ARRAY = "c1_stem"
MIN_SIDE = 32  # the smallest padded image side an exported stem takes (pixels)


def resolve_c1(asked: str, *, can_recompute: bool, existing: str | None) -> str:
    """The C1 policy a cache is made with (``store`` | ``recompute`` | ``none``, what its
    fingerprint records) for ``extract --c1 asked``: ``auto`` keeps the policy of the cache
    being completed (``existing``, None for a new one), else recomputes where it can (the
    detector has a C1 stem and the images are there to re-make C1 from), else stores."""
    if asked != "auto":
        return asked
    if existing is not None:
        return existing
    return "recompute" if can_recompute else "store"


def c1_note(policy: str, asked: str, channels: int) -> str:
    """What the storage plan says of C1: ``C1 recomputed from the images, --c1 auto``."""
    if channels == 0:
        return "no C1: the detector has no stride-4 map"
    what = {"store": "C1 stored", "recompute": "C1 recomputed from the images", "none": "C1 left out"}
    return what[policy] + (", --c1 auto" if asked == "auto" else "")


def export_stem(stem: nn.Module, root: zarr.Group) -> None:
    """Export ``stem`` (``[B, 3, H, W]`` -> ``[B, C, H/4, W/4]``) with dynamic shapes into
    ``root[STEM_ARRAY]``; the array appears only once its bytes are written. Image sides run
    from 32 pixels, or from the stem's own ``min_side`` where it has one, to 16384."""
    example = torch.zeros(2, 3, 128, 192)
    low = max(MIN_SIDE, getattr(stem, "min_side", MIN_SIDE))
    dims = {
        "b": Dim("batch", min=1, max=4096),
        "h": Dim("height", min=low, max=16384),
        "w": Dim("width", min=low, max=16384),
    }
    with torch.no_grad():
        # facts export cannot prove (Swin: ceil(ceil(H / 4) / window) >= 1, ...) become checks
        # the program makes when it runs, instead of failing the export
        program = torch.export.export(
            stem.cpu().eval(),
            (example,),
            dynamic_shapes=({0: dims["b"], 2: dims["h"], 3: dims["w"]},),
            prefer_deferred_runtime_asserts_over_guards=True,
        )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    array = root.create_array(
        STEM_ARRAY + ".tmp",
        shape=data.shape,
        chunks=data.shape,
        dtype="uint8",
        compressors=BloscCodec(cname="zstd", clevel=3),
        overwrite=True,
    )
    array[:] = data
    remember_exported(data.tobytes())  # this user made it: their own caches need no --trust-checkpoint
    array.attrs["crc32"] = checksum(data)  # checked by C1Recomputer before the program is loaded
    # renamed into place when complete (a local store: the rename is atomic); a killed export
    # leaves only the .tmp array, which the next run overwrites
    Path(root.store.root, STEM_ARRAY + ".tmp").rename(Path(root.store.root, STEM_ARRAY))


def export_detector_stem(model: Detector, root: zarr.Group) -> None:
    """``--c1 recompute``: store ``model``'s C1 stem (:meth:`Detector.c1_stem`) in the cache."""
    stem = model.c1_stem()
    if stem is None:
        raise MfcacheError(
            f"`extract.c1` recompute is not available for {model.info.family} detectors; use store or none"
        )
    export_stem(stem, root)


class C1Recomputer:
    """Re-makes the C1 map of a cached image: ``__call__(image_path, input_hw) -> [C, h/4, w/4]``
    float32, for the valid (unpadded) region, exactly as extraction's detector saw the image
    when it was alone in its batch."""

    def __init__(self, cache_path, preprocess: Preprocess):
        location = locate(cache_path)  # a folder or a place in object storage
        if not location.has_node(STEM_ARRAY):
            raise MfcacheError(f"{location} recomputes C1 but holds no {STEM_ARRAY!r} program: extract again")
        self.location, self.preprocess = location, preprocess
        self.cache_path = location.path if location.is_local else location
        # decided where it is made too: DataLoader workers that run it inherit the caller's choice
        self.trusted = files_trusted()
        self._stem = None  # loaded on first use, in the process (DataLoader worker) that uses it

    def require_trust(self, program: bytes | None = None) -> None:
        """Raise unless this user exported the cache's stored ``program`` (read if not given)
        or trusts its source (see the module doc)."""
        if self.trusted or files_trusted() or exported_here(program or self._program().tobytes()):
            return
        raise UntrustedFile(
            f"{self.cache_path} recomputes C1 with a program stored in the cache that was not exported "
            f"by your own extraction, and loading it (torch.export) can run code from the cache"
        )

    def __getstate__(self):
        return {**self.__dict__, "_stem": None}

    def _program(self) -> np.ndarray:
        """The stored program's bytes, refused unless they are exactly those extraction wrote."""
        where = f"{self.cache_path}: array {STEM_ARRAY} (the C1 program)"
        try:
            array = (
                zarr.open_array(str(self.cache_path / STEM_ARRAY), mode="r", zarr_format=3)
                if self.location.is_local
                else self.location.open_group("r")[STEM_ARRAY]
            )
            data = array[:]
        except Exception as exc:  # zarr raises many types for damaged metadata or chunks
            raise MfcacheError(f"{where} is unreadable ({type(exc).__name__}: {exc}): extract again") from None
        if array.attrs.get("crc32") != checksum(data):
            raise MfcacheError(f"{where}: checksum mismatch (its stored bytes changed after extraction): extract again")
        return data

    @torch.no_grad()
    def __call__(self, image_path: Path, input_hw: tuple[int, int]) -> Tensor:
        if self._stem is None:
            program = self._program().tobytes()
            self.require_trust(program)
            self._stem = torch.export.load(io.BytesIO(program)).module()
        image = load_image(image_path)
        if self.preprocess.input_size(*image.shape[1:]) != tuple(input_hw):
            raise MfcacheError(f"{image_path} is not the image this cache was extracted from (its size differs)")
        pixels, _ = pad_batch([to_input(image, self.preprocess)], self.preprocess)
        c1 = self._stem(pixels)[0]
        h, w = c1_size(input_hw)
        return c1[:, :h, :w]
