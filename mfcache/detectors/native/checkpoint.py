"""Loading H-DETR / DINO checkpoints of the original repos: spec options, the key table,
and strict state-dict matching.

Spec: ``hdetr:<file.pth>[?option=value&...]`` / ``dino:<file.pth>[?...]``. The file is a
``torch.save`` dict whose ``"model"`` entry is the state dict (as both repos save it); it is
read without running code from the file (:mod:`mfcache.checkpoint_io`).
Options (all optional: what the checkpoint's tensors fix is read from them,
:mod:`~mfcache.detectors.native.architecture`; an option given must agree with them):

- architecture (:class:`~mfcache.detectors.native.detector.NativeConfig` and the family
  config): ``backbone`` (resnet50 | resnet101 | resnet18 | resnet34 | swin_tiny | swin_small |
  swin_base | swin_large), ``window`` (Swin), ``dilation`` (ResNet DC5), ``d_model``, ``nheads``,
  ``enc_layers``, ``dec_layers``, ``dim_feedforward``, ``num_feature_levels``,
  ``backbone_levels``, ``enc_n_points``, ``dec_n_points``, ``num_classes``; H-DETR:
  ``num_queries`` (one-to-one queries, 300), ``num_queries_one2many`` (1500), ``two_stage``,
  ``box_refine``, ``mixed_selection`` (1/0); DINO: ``num_queries`` (900), ``dn_labelbook_size``
  (default: read from the checkpoint's ``label_enc.weight``, which inference never uses);
- ``labels=<file.json>``: a JSON list of class names, index = class id (default: the 91-entry
  COCO list of the original repos); sets ``num_classes``;
- ``shortest_edge`` / ``longest_edge``: the resize rule (default 800 / 1333).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from torch import Tensor, nn

from mfcache.checkpoint_io import load_checkpoint
from mfcache.errors import MfcacheError

# ---------------------------------------------------------------------------- the key table
# Native modules carry the published names, so a checkpoint key maps to itself unless one of
# these rules applies. Correct names here, in one place.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^module\.", ""),  # saved from a DistributedDataParallel wrapper
    # DINO's Joiner wraps its Swin directly (backbone.0.layers...); H-DETR's has a body
    (r"^backbone\.0\.(patch_embed|layers|norm\d)\.", r"backbone.0.body.\1."),
)
# The originals hang their per-layer heads on the decoder as well, so their state dicts hold
# each head under two names; a checkpoint may carry either, the other is filled from it.
ALIASES: tuple[tuple[str, str], ...] = (
    ("transformer.decoder.bbox_embed.", "bbox_embed."),
    ("transformer.decoder.class_embed.", "class_embed."),
)
IGNORED = re.compile(r"\.num_batches_tracked$")  # BatchNorm counters (the backbone's BN is frozen)

# Beyond tensors, containers and numbers, the released files hold their training arguments
# (``"args"``: an argparse.Namespace of strings, numbers and lists) next to the optimizer and
# lr-scheduler state (plain dicts; MultiStepLR's milestones are a Counter, which torch allows).
RELEASED_CHECKPOINT_TYPES: tuple[type, ...] = (argparse.Namespace,)

EXTRA_OPTIONS = ("labels", "shortest_edge", "longest_edge")
_SHOWN = 4  # names listed in an error before "..."


def parse_spec(arg: str, family: str) -> tuple[Path, dict[str, str]]:
    """``<file>[?k=v&...]`` -> (file, options)."""
    path, _, query = arg.partition("?")
    if not path:
        raise MfcacheError(f"detector spec '{family}:' needs a checkpoint file, e.g. {family}:./checkpoint.pth")
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key in options:
            raise MfcacheError(f"detector spec {family}:{arg}: option {key!r} given twice")
        options[key] = value
    if query and not options:
        raise MfcacheError(f"detector spec {family}:{arg}: cannot read options {query!r} (use ?key=value&key=value)")
    return Path(path).expanduser(), options


def _coerce(key: str, value: str, kind: str, where: str):
    try:
        if kind == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(value)
        return value
    except ValueError:
        expected = "1 or 0" if kind == "bool" else "an integer"
        raise MfcacheError(f"{where}: option {key}={value!r} must be {expected}") from None


def parse_options(cfg_cls: type, options: dict[str, str], where: str) -> tuple[dict, dict[str, str]]:
    """(the architecture options typed as the family config's fields, the other options)."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(options) - set(fields) - set(EXTRA_OPTIONS))
    if unknown:
        raise MfcacheError(
            f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields) + list(EXTRA_OPTIONS))}"
        )
    values = {k: _coerce(k, v, fields[k], where) for k, v in options.items() if k in fields}
    extra = {k: v for k, v in options.items() if k in EXTRA_OPTIONS}
    return values, extra


def read_labels(path: str, where: str) -> tuple[str, ...]:
    try:
        names = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise MfcacheError(f"{where}: cannot read labels file {path}: {exc}") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise MfcacheError(f"{where}: labels file {path} must hold a JSON list of class names")
    return tuple(names)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """``torch.load(path)["model"]``, with user-facing errors; the file may hold only what
    the released checkpoints hold (:data:`RELEASED_CHECKPOINT_TYPES`), and everything but
    ``"model"`` is dropped."""
    if not path.is_file():
        raise MfcacheError(f"checkpoint file not found: {path}")
    ckpt = load_checkpoint(path, what="detector checkpoint", allow=RELEASED_CHECKPOINT_TYPES)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        keys = ", ".join(map(str, list(ckpt)[:_SHOWN])) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise MfcacheError(f"{path}: expected a dict with the state dict under 'model' (found: {keys})")
    return ckpt["model"]


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOWN else ''})"


def rename_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint names -> native names (RENAMES; IGNORED dropped); no checks."""
    out = {}
    for key, value in state.items():
        if IGNORED.search(key):
            continue
        for pattern, repl in RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def map_state_dict(state: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint names -> native names (RENAMES, IGNORED, and the ALIASES ``expected`` needs); no checks."""
    out = rename_keys(state)
    for alias, canonical in ALIASES:
        for key in expected:
            for a, b in ((alias, canonical), (canonical, alias)):
                if key.startswith(a) and key not in out and b + key[len(a) :] in out:
                    out[key] = out[b + key[len(a) :]]
    return out


def load_weights(model: nn.Module, state: dict[str, Tensor], where: str, family: str) -> None:
    """Strictly load ``state`` into ``model``; one MfcacheError naming what does not fit."""
    expected = model.state_dict()
    state = map_state_dict(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"unexpected {_names(unexpected)}"] if unexpected else []
        )
        raise MfcacheError(
            f"{where}: checkpoint does not fit the {family} architecture: {'; '.join(parts)}; "
            "check the spec options (nheads, num_queries, ...)"
        )
    differ = [
        a + k[len(a) :]
        for a, c in ALIASES
        for k in expected
        if k.startswith(a) and c + k[len(a) :] in state and not torch.equal(state[k], state[c + k[len(a) :]])
    ]
    if differ:
        raise MfcacheError(f"{where}: the heads listed twice in the checkpoint differ: {_names(differ)}")
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise MfcacheError(
            f"{where}: {len(wrong)} weight(s) have other shapes than the {family} architecture "
            f"(checkpoint vs model), e.g. {'; '.join(wrong[:2])}; check the spec options "
            "(nheads, num_queries, ...)"
        )
    model.load_state_dict(state, strict=True)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """A checkpoint-style ``model`` dict of random weights with these shapes (``{key: shape}``,
    keys as the original repositories name them), scaled so a full-size model's activations
    stay finite: the compute of a trained model, for tests and benchmarks (nothing can be
    downloaded). BatchNorm variances and frozen BN scales are positive; the decoder's per-layer
    heads share their weights under both of the originals' names, as there."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif "body" in key and key.endswith(".weight") and len(shape) == 1:  # frozen BN scale
            state[key] = torch.rand(shape, generator=gen) * 0.5 + 0.25
        else:
            fan_in = 1
            for size in shape[1:]:
                fan_in *= size
            scale = 0.3 / max(1.0, fan_in**0.5) if len(shape) > 1 else 0.1
            state[key] = torch.randn(shape, generator=gen) * scale
    prefix = "transformer.decoder."
    for key in state:  # the per-layer heads are one module under two names in the originals
        if key.startswith(prefix) and key[len(prefix) :] in state:
            state[key] = state[key[len(prefix) :]]
    return state
