"""Configuration: frozen dataclasses, TOML files and ``--set a.b=value`` overrides,
resolved in one place (:func:`resolve_run_config`) and saved into every checkpoint and
metrics file.

A head preset is a short TOML file whose top-level keys are :class:`HeadConfig` fields and
whose optional ``[train]`` / ``[eval]`` tables override :class:`TrainConfig` /
:class:`EvalConfig` (see ``mfcache/heads/presets/``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mfcache.errors import MfcacheError

PRESET_DIR = Path(__file__).parent / "heads" / "presets"


@dataclass(frozen=True)
class ExtractConfig:
    """Stage 1: how the frozen detector's outputs are cached."""

    topk: int = 100            # detections kept per image (the paper's top-100 queries)
    target_size: int = 64      # side of the stored per-query GT mask crops (heads resample)
    batch_size: int = 2        # detector batch
    block_size: int = 16       # images per write; each block owns whole chunks (resume unit)
    chunk_tokens: int = 0      # memory chunk length in tokens; 0 = derive from image size
    c1: str = "store"          # store | recompute (from the image at train time) | none
    dtype: str = "float16"     # storage dtype of memory / c1 / queries: float16 | float32 | int8 (per-channel)
    levels: tuple[int, ...] = ()  # encoder levels stored in memory (0 = finest); () = all
    compress: bool = False     # blosc zstd + shuffle on the feature arrays (slow storage only)
    resize: str = "auto"       # pixel path: auto (the detector's own) | processor (= its image processor's) | float
    num_workers: int = 2       # image-decoding processes
    device: str = "auto"


@dataclass(frozen=True)
class HeadConfig:
    """Stage 2: the mask head (DESIGN §5). The default is the paper's box-level baseline."""

    name: str = "box_baseline"
    description: str = ""      # one line shown by `mfcache heads`
    region: str = "box"        # box: RoIAlign inside each box | image: q . F over the whole map, then crop
    roi_size: int = 32         # M: masks are predicted at M x M inside the box (16, 32 or 64)
    level: int = 0             # encoder level fused with C1 (0 = finest, stride 8)
    use_c1: bool = True        # add the backbone's stride-4 map to the fused feature map
    channels: int = 0          # fused-map channels (channel mapper d -> d'); 0 = the detector's d_model
    encoder: str = "none"      # image feature encoder on the cached memory: none | deformable | swin | convnext
    encoder_depth: int = 1     # blocks of that encoder
    neck: str = "none"         # on C1: none (1x1 projection only if channels differ) | conv_gn (1x1 conv + GroupNorm)
    box_encoder_depth: int = 0  # transformer layers over the M x M RoI tokens (query token prepended)
    query_encoder: tuple[str, ...] = ()  # in order, from: self_attn, box_cross_attn, ffn
    predictor: str = "dot"     # dot | blender (BlendMask) | fcn (Mask R-CNN style)
    blender_bases: int = 4     # blender: K bases from the fused map
    blender_attn_size: int = 14  # blender: m, per-query K x m x m attentions
    scoring: str = "mask_prob"  # class | mask_prob (class x mean prob over pixels > 0.5) | mask_iou (class x learned IoU)
    quality_weight: float = 1.0  # mask_iou: weight of the quality (IoU regression) loss
    loss: str = "bce_dice"     # bce_dice on the whole RoI | point (BCE + dice on sampled points)
    points: int = 1024         # point loss: N sampled points per mask
    oversample: float = 3.0    # point loss: k, candidates = k * N random points
    importance: float = 0.75   # point loss: beta, share of the N points taken as the most uncertain


@dataclass(frozen=True)
class TrainConfig:
    """Stage 2: optimisation. Defaults follow the paper's recipe (DESIGN §5)."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-5
    lr_drops: tuple[float, ...] = (0.9, 0.95)   # lr x0.1 at these fractions of the schedule
    grad_clip: float = 1.0
    min_iou: float = 0.5       # a query trains on the GT it overlaps most if box IoU >= this
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    seed: int = 0
    num_workers: int = 2      # cache-reading processes (overlap reads with compute and each other)
    checkpoint_every: int = 500
    log_every: int = 25
    device: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """Stage 3: turning head outputs into COCO results."""

    mask_threshold: float = 0.5
    batch_size: int = 8
    max_detections: int = 100


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on besides the cache; stored in its checkpoint."""

    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(
            head=_build(HeadConfig, d.get("head", {}), "head"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            eval=_build(EvalConfig, d.get("eval", {}), "eval"),
        )


def _coerce(value, annotation, where: str):
    """Check a TOML value against a dataclass field type (lists become tuples)."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MfcacheError(f"{where}: expected a list, got {value!r}")
        return tuple(float(v) if isinstance(v, int) else v for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise MfcacheError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str) and (isinstance(value, bool) or not isinstance(value, annotation)):
        raise MfcacheError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, section: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise MfcacheError(f"unknown {section} option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


def _parse_value(text: str):
    """TOML value syntax (numbers, true/false, [lists], "strings"); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(overrides: list[str]) -> dict[str, dict]:
    """``["train.lr=1e-4", "head.roi_size=64"]`` -> ``{"train": {"lr": 1e-4}, "head": {...}}``."""
    nested: dict[str, dict] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in ("head", "train", "eval"):
            raise MfcacheError(f"--set expects head.KEY=VALUE, train.KEY=VALUE or eval.KEY=VALUE, got {item!r}")
        nested.setdefault(section, {})[name] = _parse_value(value.strip())
    return nested


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_head_file(head: str) -> dict:
    """A preset name or a TOML file path -> ``{"head": {...}, "train": {...}, "eval": {...}}``."""
    path = Path(head)
    if not (head.endswith(".toml") or path.is_file()):
        path = PRESET_DIR / f"{head}.toml"
        if not path.is_file():
            raise MfcacheError(f"unknown head preset {head!r}; presets: {', '.join(preset_names())}")
    elif not path.is_file():
        raise MfcacheError(f"head file not found: {head}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MfcacheError(f"invalid TOML in {path}: {exc}") from None
    sections = {"train": data.pop("train", {}), "eval": data.pop("eval", {})}
    data.setdefault("name", path.stem)
    return {"head": data, **sections}


def resolve_run_config(head: str | None = None, overrides: list[str] | None = None,
                       base: RunConfig | None = None) -> RunConfig:
    """The one place a run's configuration is decided: defaults (or ``base``, e.g. the
    configuration stored in a run being resumed) < head preset/file < --set. Every field's
    range is checked (:func:`check_config`)."""
    merged: dict[str, dict] = base.to_dict() if base is not None else {"head": {}, "train": {}, "eval": {}}
    if head:
        for section, values in load_head_file(head).items():
            merged[section].update(values)
    for section, values in parse_overrides(overrides or []).items():
        merged[section].update(values)
    config = RunConfig.from_dict(merged)
    check_config(config)
    return config


def with_overrides(config, overrides: dict):
    """A frozen dataclass with some fields replaced, type-checked like a TOML file."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise MfcacheError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    config = dataclasses.replace(config, **{k: _coerce(v, hints[k], k) for k, v in overrides.items()})
    check_config(config)
    return config


# --- ranges: every field of every config has a check (tests/test_meaningful_runs.py asserts it) ---

Check = Callable[[object], str | None]  # a value -> what is wrong with it, None if fine


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Check:
    return lambda v: None if _number(v) and v >= low else f"must be {'' if _number(v) else 'a finite number '}>= {low:g}"


def above(low: float) -> Check:
    return lambda v: None if _number(v) and v > low else f"must be {'' if _number(v) else 'a finite number '}> {low:g}"


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    def check(v):
        ok = _number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        return None if ok else f"must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return check


def one_of(*choices) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def each(check: Check) -> Check:
    """A check of every item of a tuple."""
    def check_all(values):
        problems = [p for p in map(check, values) if p]
        return f"must have every item {problems[0].removeprefix('must be ')}" if problems else None
    return check_all


def anything(_value) -> None:
    return None


def _run_name(v) -> str | None:  # a sweep makes a folder of this name
    return None if v and v not in (".", "..") and not re.search(r"[/\\]", v) else "must be a non-empty folder name (no / or \\)"


def _device(v) -> str | None:
    return None if re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", v) else "must be auto, cpu, cuda or cuda:N"


HEAD_CHOICES = {  # the heads builder (mfcache/heads) composes exactly these
    "region": ("box", "image"),
    "roi_size": (16, 32, 64),
    "encoder": ("none", "deformable", "swin", "convnext"),
    "neck": ("none", "conv_gn"),
    "query_encoder": ("self_attn", "box_cross_attn", "ffn"),
    "predictor": ("dot", "blender", "fcn"),
    "scoring": ("class", "mask_prob", "mask_iou"),
    "loss": ("bce_dice", "point"),
}

RANGES: dict[type, dict[str, Check]] = {
    ExtractConfig: {
        "topk": at_least(1), "target_size": at_least(8), "batch_size": at_least(1), "block_size": at_least(1),
        "chunk_tokens": at_least(0), "c1": one_of("store", "recompute", "none"),
        "dtype": one_of("float16", "float32", "int8"), "levels": each(at_least(0)), "compress": anything,
        "resize": one_of("auto", "processor", "float"),
        "num_workers": at_least(0), "device": _device,
    },
    HeadConfig: {
        "name": _run_name, "description": anything,
        **{k: (each(one_of(*v)) if k == "query_encoder" else one_of(*v)) for k, v in HEAD_CHOICES.items()},
        "level": at_least(0), "use_c1": anything, "channels": at_least(0), "encoder_depth": at_least(1),
        "box_encoder_depth": at_least(0), "blender_bases": at_least(1), "blender_attn_size": at_least(1),
        "quality_weight": at_least(0), "points": at_least(1), "oversample": at_least(1),
        "importance": between(0, 1),
    },
    TrainConfig: {
        "steps": at_least(1), "batch_size": at_least(1), "lr": above(0),
        "betas": lambda v: None if len(v) == 2 and not each(between(0, 1, open_high=True))(v)
        else "must be two numbers in [0, 1)",
        "weight_decay": at_least(0), "lr_drops": each(between(0, 1, open_low=True)), "grad_clip": at_least(0),
        "min_iou": between(0, 1), "bce_weight": at_least(0), "dice_weight": at_least(0), "seed": at_least(0),
        "num_workers": at_least(0), "checkpoint_every": at_least(1), "log_every": at_least(1), "device": _device,
    },
    EvalConfig: {
        "mask_threshold": between(0, 1, open_low=True, open_high=True), "batch_size": at_least(1),
        "max_detections": at_least(1),
    },
}
SECTIONS = {ExtractConfig: "extract", HeadConfig: "head", TrainConfig: "train", EvalConfig: "eval"}


def config_problems(config) -> list[str]:
    """One line per field of ``config`` (a :class:`RunConfig` or one of its sections, or an
    :class:`ExtractConfig`) whose value is out of range, e.g. ``train.steps must be ... got 0``."""
    if isinstance(config, RunConfig):
        return [p for part in (config.head, config.train, config.eval) for p in config_problems(part)]
    section, problems = SECTIONS[type(config)], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = RANGES[type(config)][f.name](value)
        if problem:
            problems.append(f"{section}.{f.name} {problem}, got {value!r}")
    if isinstance(config, TrainConfig) and config.bce_weight == 0 and config.dice_weight == 0:
        problems.append("train.bce_weight and train.dice_weight are both 0: the head would learn nothing")
    return problems


def check_config(config) -> None:
    """Raise :class:`MfcacheError` listing every out-of-range field, one line each."""
    problems = config_problems(config)
    if problems:
        raise MfcacheError("\n".join(problems))


# --- resuming a run: which fields may change ---

# Fields a resumed run may change: how long it trains (train.steps; the lr schedule is that of
# the new length from the resumed step on) and how it runs, never what it learns from.
RESUMABLE = ("train.steps", "train.num_workers", "train.device", "train.checkpoint_every", "train.log_every")


def _flat(config: RunConfig) -> dict[str, object]:
    return {f"{section}.{k}": v for section, values in config.to_dict().items() for k, v in values.items()}


def resume_config(stored: RunConfig, *, at_step: int, run: str | Path, requested: RunConfig | None = None,
                  overrides: list[str] | None = None) -> RunConfig:
    """The configuration a run resumed at step ``at_step`` continues with: ``requested`` (a
    whole configuration, e.g. from ``--head``), else the ``stored`` one with ``overrides``
    (``--set`` strings) applied. Raises naming every changed field outside :data:`RESUMABLE`,
    or a ``train.steps`` below the step the run already reached."""
    config = requested if requested is not None else resolve_run_config(None, overrides, base=stored)
    old, new = _flat(stored), _flat(config)
    changed = [k for k in new if new[k] != old.get(k) and k not in RESUMABLE]
    if changed:
        what = ", ".join(f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in changed)
        raise MfcacheError(f"{run} was trained with another configuration: {what}; resume it without "
                           f"--head/--set (only {', '.join(RESUMABLE)} may change)")
    if config.train.steps < at_step:
        raise MfcacheError(f"{run} is already at step {at_step}: train.steps={config.train.steps} would end "
                           "before it (use a larger train.steps to extend the run)")
    return config
