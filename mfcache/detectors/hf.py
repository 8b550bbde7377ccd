"""Load a saved transformers DETR-family detector (``hf:<local dir or hub id>``).

The adapter is chosen by ``config.json``'s ``model_type`` from :data:`ADAPTERS`; the
shared machinery lives in :mod:`mfcache.detectors.hf_base`, each family in its own module
(``hf_detr``: DETR, Conditional DETR, DAB-DETR; ``hf_deformable``: Deformable DETR;
``hf_rtdetr``: RT-DETR, RT-DETRv2, D-FINE, DEIMv2; ``hf_lwdetr``: LW-DETR, RF-DETR; open-vocabulary
detectors, whose classes are the phrases of a text prompt, share ``hf_open_vocab``: ``hf_grounding``:
Grounding DINO, MM Grounding DINO; ``hf_omdet``: OmDet-Turbo). Preprocessing is read from the model's
``preprocessor_config.json`` (or a whole processor's ``processor_config.json``) and, on the
default ``processor`` path, gives the pixels of the processor ``AutoImageProcessor`` loads for
it (:func:`mfcache.data.transforms.to_input`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mfcache.detectors.base import IMAGENET_MEAN, IMAGENET_STD, Detector, Preprocess, state_dict_sha256
from mfcache.detectors.hf_base import HFDetector, input_hw_from_mask
from mfcache.detectors.hf_deformable import HFDeformableDetr
from mfcache.detectors.hf_detr import HFConditionalDetr, HFDabDetr, HFDetr
from mfcache.detectors.hf_grounding import HFGroundingDino, HFMMGroundingDino
from mfcache.detectors.hf_lwdetr import HFLwDetr, HFRfDetr
from mfcache.detectors.hf_omdet import HFOmDetTurbo
from mfcache.detectors.hf_rtdetr import HFDeimV2, HFDFine, HFRTDetr, HFRTDetrV2
from mfcache.errors import MfcacheError
from mfcache.hashing import file_sha256

__all__ = ["ADAPTERS", "HFDeformableDetr", "HFDetector", "input_hw_from_mask", "load_hf", "read_preprocess"]

ADAPTERS: dict[str, type[HFDetector]] = {
    cls.family: cls
    for cls in (
        HFDetr,
        HFConditionalDetr,
        HFDabDetr,
        HFDeformableDetr,
        HFRTDetr,
        HFRTDetrV2,
        HFDFine,
        HFDeimV2,
        HFLwDetr,
        HFRfDetr,
    )
}
ADAPTERS.update({cls.family: cls for cls in (HFGroundingDino, HFMMGroundingDino, HFOmDetTurbo)})  # text prompts


# --------------------------------------------------------------------------- loading
def _looks_like_path(path: str) -> bool:
    return (
        path.startswith(("/", ".", "~"))
        or "\\" in path
        or path.count("/") > 1
        or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)
    )


def _resolve(path: str, filename: str, *, required: bool) -> Path | None:
    """Local path of ``filename`` in a model directory or (network permitting) a hub repo."""
    local = Path(path).expanduser()
    if local.is_dir():
        found = local / filename
        if found.is_file():
            return found
        if required:
            raise MfcacheError(f"{path}: no {filename} (not a saved transformers model directory)")
        return None
    if local.exists():
        raise MfcacheError(f"{path} is a file; expected a transformers model directory")
    if _looks_like_path(path):
        raise MfcacheError(f"model directory not found: {path}")
    from transformers.utils import cached_file

    try:
        if required:  # let the hub say why (offline, no such repo, gated, ...)
            found = cached_file(path, filename)
        else:
            found = cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's to fix
        raise MfcacheError(
            f"cannot load {path!r}: no such local directory, and the hub could not "
            f"provide {filename} ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if found is None and required:
        raise MfcacheError(f"{path!r}: the hub repo has no {filename}")
    return Path(found) if found is not None else None


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


BILINEAR = 2  # PIL's (and transformers' PILImageResampling) code for bilinear resampling


def read_preprocess(path: Path | None, default: Preprocess = Preprocess()) -> Preprocess:
    """Preprocess from a ``preprocessor_config.json``; what it leaves out (or the whole
    file, when ``path`` is None) comes from ``default``, the family's processor defaults.
    Reads the resize rule, ``resample`` (bilinear only), ``do_rescale``/``rescale_factor``,
    ``do_normalize``/``image_mean``/``image_std`` and ``do_pad``/``pad_size``; a whole
    processor's ``processor_config.json`` (image processor and tokenizer saved together) holds
    them under ``image_processor``."""
    if path is None:
        return default
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MfcacheError(f"cannot read {path}: {exc}") from None
    if isinstance(cfg.get("image_processor"), dict):
        cfg = cfg["image_processor"]
    size = cfg.get("size")
    shortest, longest, fixed_size = default.shortest_edge, default.longest_edge, default.fixed_size
    if isinstance(size, dict) and "height" in size and "width" in size:  # RT-DETR-style plain resize
        fixed_size = (int(size["height"]), int(size["width"]))
    elif isinstance(size, int):
        shortest, longest, fixed_size = size, int(cfg.get("max_size") or default.longest_edge), None
    elif isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
        longest = int(size.get("longest_edge") or cfg.get("max_size") or default.longest_edge)
        fixed_size = None
    elif size is not None:
        raise MfcacheError(
            f"{path}: resize rule {size!r} is not supported; mfcache resizes by "
            "shortest_edge/longest_edge or to a fixed height/width"
        )
    resample = cfg.get("resample", BILINEAR)
    if resample != BILINEAR:
        raise MfcacheError(
            f"{path}: resample {resample!r} is not supported; mfcache resizes bilinearly "
            f"(resample {BILINEAR}, what DETR-family processors use)"
        )
    rescale_factor = float(cfg.get("rescale_factor", default.rescale_factor)) if cfg.get("do_rescale", True) else 1.0
    if "do_normalize" not in cfg:
        mean, std = default.mean, default.std
    elif cfg["do_normalize"]:
        mean = tuple(float(v) for v in cfg.get("image_mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in cfg.get("image_std", IMAGENET_STD))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    pad_size = cfg.get("pad_size") if cfg.get("do_pad", True) else None
    if pad_size is not None:
        if not (isinstance(pad_size, dict) and "height" in pad_size and "width" in pad_size):
            raise MfcacheError(f'{path}: pad_size {pad_size!r} must be {{"height": h, "width": w}}')
        pad_size = (int(pad_size["height"]), int(pad_size["width"]))
    return Preprocess(
        shortest_edge=shortest,
        longest_edge=longest,
        mean=mean,
        std=std,
        pad_divisor=default.pad_divisor,
        fixed_size=fixed_size,
        pad_size=pad_size or default.pad_size,
        resize=default.resize,
        rescale_factor=rescale_factor,
    )


def load_hf(
    path: str, spec: str | None = None, *, preprocess: Preprocess | None = None, trained: bool = True
) -> Detector:
    """Load a saved transformers detector (a local directory; a hub id needs network).

    The adapter is chosen by ``config.json``'s ``model_type``; ``preprocess`` overrides
    the one read from ``preprocessor_config.json`` (else the family's processor defaults).
    """
    spec = spec or f"hf:{path}"
    config_path = _resolve(path, "config.json", required=True)
    try:
        model_config = json.loads(config_path.read_text())
        model_type = model_config.get("model_type")
    except (OSError, ValueError) as exc:
        raise MfcacheError(f"cannot read {config_path}: {exc}") from None
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise MfcacheError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    import transformers

    model_cls = getattr(transformers, adapter.model_class_for(model_config.get("architectures")))
    source = str(Path(path).expanduser()) if Path(path).expanduser().is_dir() else path
    transformers.utils.logging.disable_progress_bar()  # mfcache draws its own; no bar per loaded model
    try:
        model, loading = model_cls.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    except ImportError as exc:  # e.g. a timm backbone without timm installed
        raise MfcacheError(f"{path}: cannot build the model: {_first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise MfcacheError(f"{path}: cannot load the model: {_first_line(exc)}") from None
    if loading.get("missing_keys"):
        missing = sorted(loading["missing_keys"])
        raise MfcacheError(
            f"{path}: checkpoint lacks {len(missing)} weights the model needs "
            f"(e.g. {missing[0]}); refusing to run a partly random detector"
        )
    if preprocess is None:
        found = _resolve(path, "preprocessor_config.json", required=False) or _resolve(
            path, "processor_config.json", required=False
        )
        preprocess = read_preprocess(found, adapter.default_preprocess)
    weights = _resolve(path, "model.safetensors", required=False)
    sha = file_sha256(weights) if weights is not None else state_dict_sha256(model)
    extra = {"tokenizer": _load_tokenizer(source, path)} if adapter.open_vocabulary else {}
    return adapter(model, spec=spec, preprocess=preprocess, weights_sha256=sha, trained=trained, **extra)


def _load_tokenizer(source: str, path: str):
    """The tokenizer saved with an open-vocabulary model (its processor's), which turns prompts into tokens."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise MfcacheError(
            f"{path}: cannot load the tokenizer its text prompts need ({_first_line(exc)}); save "
            "the model's processor into the directory (processor.save_pretrained(dir))"
        ) from None
