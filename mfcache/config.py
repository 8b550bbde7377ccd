"""Configuration: frozen dataclasses, TOML files and ``--set a.b=value`` overrides,
resolved in one place (:func:`resolve_run_config`) and saved into every checkpoint and
metrics file.

A head preset is a short TOML file whose top-level keys are :class:`HeadConfig` fields and
whose optional ``[train]`` / ``[eval]`` tables override :class:`TrainConfig` /
:class:`EvalConfig` (see ``mfcache/heads/presets/``).

Each field is declared with :func:`mfcache.options.option`: its description and allowed values live next to
it, and the range checks (:data:`RANGES`), the heads builder's choices (:data:`HEAD_CHOICES`)
and the ``mfcache extract`` options are derived from there.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mfcache.errors import MfcacheError
from mfcache.options import (
    Check,
    above,
    anything,
    between,
    device_name,
    distinct_names,
    each,
    machine_workers,
    option,
    run_name,
)

PRESET_DIR = Path(__file__).parent / "heads" / "presets"

AMP_CHOICES = {"off": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}


@dataclass(frozen=True)
class ExtractConfig:
    """Stage 1: how the frozen detector's outputs are cached. Each field's help is its
    `mfcache extract` option's (mfcache/cli/extract.py builds the options from these fields)."""

    topk: int = option(100, low=1, help="Detections cached per image.")  # the paper's top-100 queries
    target_size: int = option(64, low=8, help="Side of the cached per-query GT mask crops.")  # heads resample
    batch_size: int = option(2, low=1, help="Detector batch size.")
    block_size: int = option(
        16, low=1, help="Images per write (the resume unit); fixed when the split is created."
    )  # each block owns whole chunks
    chunk_tokens: int = option(
        0, low=0, help="Memory chunk length in tokens; 0 = derive from the image size (not a CLI option)."
    )
    c1: str = option(
        "auto",
        help="Backbone stride-4 map: {choices}.",
        choices={
            "auto": "recompute where the detector can, else store; an existing cache keeps its own",
            "store": "",
            "recompute": "from the image at training time",
            "none": "",
        },
    )
    dtype: str = option(
        "float16",
        help="Storage dtype of features: {choices}.",
        choices={  # memory, c1, queries
            "float16": "",
            "float32": "",
            "int8": "per-channel scales, ~1% error, half of float16",
        },
    )
    levels: tuple[int, ...] = option((), low=0, help="Encoder levels to store, e.g. 0,1 (0 = finest); default all.")
    compress: bool = option(
        False, check=anything, help="Blosc zstd + shuffle on the features (only pays on slow storage)."
    )
    resize: str = option(
        "auto",
        help="Pixel path: {choices}.",
        choices={
            "auto": "the detector's own: processor for hf: (float-noaa for RF-DETR), float for demo",
            "processor": "the same pixels as the checkpoint's transformers image processor",
            "float": "rescale, then resize the float image without rounding; the demo was trained on it",
            "float-noaa": "the float path without antialiasing (RF-DETR's processor)",
        },
    )
    num_workers: int = option(
        machine_workers(), low=0, flag="--workers", help="Image-decoding processes (default: for this machine, 2 to 8)."
    )
    device: str = option("auto", check=device_name, help="auto, cpu, cuda or cuda:N.")
    amp: str = option(
        "off",
        help="Mixed precision for the detector's forward pass: {choices} (the cache keeps "
        "its --dtype; recorded in the fingerprint).",
        choices=AMP_CHOICES,
    )
    # mfcache/data/labels.py: the file is read and checked there; its map goes into the fingerprint
    label_map: str = option(
        "",
        check=anything,
        help="JSON file mapping detector labels to dataset categories: "
        '{"detector label": "category name" or category id or null}; '
        "labels it leaves out map by name (recorded in the fingerprint).",
    )
    class_agnostic: bool = option(
        False,
        check=anything,
        help="Every detection is a candidate whatever its label; "
        "eval scores all categories as one (recorded in the "
        "fingerprint).",
    )
    # mfcache/data/prompts.py: the file is read and checked there; its phrases go into the fingerprint
    prompts: str = option(
        "",
        check=anything,
        help="Open-vocabulary detectors: JSON file of the text prompt, a list "
        '["phrase", ...] or {"category name": "phrase"}; default: the '
        "dataset's category names (recorded in the fingerprint).",
    )
    views: int = option(
        1,
        low=1,
        help="Views cached per image: view 0 the plain image, views 1.. flipped and/or "
        "rescaled (mfcache/data/views.py); training draws one per image per epoch "
        "(recorded in the fingerprint).",
    )
    view_crop: float = option(
        0.0,
        check=between(0, 1),
        help="Probability a view >= 1 is first randomly cropped "
        "(DETR's random crop; each side 0.5..1.0 of the image's, "
        "mfcache/data/views.py); 0 = never. Needs --views > 1 "
        "(recorded in the fingerprint).",
    )


@dataclass(frozen=True)
class HeadConfig:
    """Stage 2: the mask head (design §5, docs/design.md). The default is the paper's box-level baseline.
    The fields with choices are exactly what the heads builder (mfcache/heads) composes."""

    name: str = option("box_baseline", check=run_name)
    description: str = option("", check=anything, help="One line shown by `mfcache heads`.")
    region: str = option(
        "box",
        help="Where masks are predicted: {choices}.",
        choices={"box": "RoIAlign inside each box", "image": "q . F over the whole map, then crop"},
    )
    roi_size: int = option(32, choices=(16, 32, 64), help="M: masks are predicted at M x M inside the box ({choices}).")
    level: int = option(0, low=0, help="Encoder level fused with C1 (0 = finest, stride 8).")
    use_c1: bool = option(True, check=anything, help="Add the backbone's stride-4 map to the fused feature map.")
    channels: int = option(0, low=0, help="Fused-map channels (channel mapper d -> d'); 0 = the detector's d_model.")
    encoder: str = option(
        "none",
        choices=("none", "deformable", "swin", "convnext"),
        help="Image feature encoder on the cached memory: {choices}.",
    )
    encoder_depth: int = option(1, low=1, help="Blocks of that encoder.")
    encoder_activation: str = option(
        "relu",
        help="deformable encoder: its FFN's activation, {choices} (Swin and ConvNeXt blocks always use GELU).",
        choices={"relu": "Deformable DETR's", "gelu": "the paper's"},
    )
    neck: str = option(
        "none",
        help="On C1: {choices}.",
        choices={"none": "1x1 projection only if channels differ", "conv_gn": "1x1 conv + GroupNorm"},
    )
    box_encoder_depth: int = option(0, low=0, help="Transformer layers over the M x M RoI tokens.")
    box_encoder_query: bool = option(
        True,
        check=anything,
        help="box encoder: prepend the query as an extra token "
        "(it reads its RoI and is updated); false = the "
        "paper's, RoI tokens only.",
    )
    query_encoder: tuple[str, ...] = option(
        (), choices=("self_attn", "box_cross_attn", "ffn"), help="Query encoder layers in order, from: {choices}."
    )
    predictor: str = option(
        "dot", help="Mask predictor: {choices}.", choices={"dot": "", "blender": "BlendMask", "fcn": "Mask R-CNN style"}
    )
    fused_norm: str = option(
        "none",
        help="Normalisation of F before the mask predictor: {choices}.",
        choices={
            "none": "the paper's raw sum",
            "layer": "LayerNorm over channels at each pixel",
            "group": "GroupNorm (32 groups) over each image's map",
        },
    )
    dot_logit: str = option(
        "fixed",
        help="dot predictor's logit: {choices}.",
        choices={
            "fixed": "the paper's q . R / sqrt(C)",
            "affine": "s * q . R / sqrt(C) + b, learned scalars s (init 1) and b (init 0)",
        },
    )
    query_init: str = option(
        "default",
        help="Query projection's init: {choices}.",
        choices={
            "default": "PyTorch's Linear init",
            "zero": "zero weight and bias (every query starts as one shared map)",
            "small": "weight x 0.1",
        },
    )
    blender_bases: int = option(4, low=1, help="blender: K bases from the fused map.")
    blender_attn_size: int = option(14, low=1, help="blender: m, per-query K x m x m attentions.")
    scoring: str = option(
        "mask_prob",
        help="Mask score: {choices}.",
        choices={"class": "", "mask_prob": "class x mean prob over pixels > 0.5", "mask_iou": "class x learned IoU"},
    )
    quality_weight: float = option(1.0, low=0, help="mask_iou: weight of the quality (IoU regression) loss.")
    quality_head: str = option(
        "pool",
        help="mask_iou: the quality head's read-out after its two convs: {choices}.",
        choices={
            "pool": "global average pool + one linear layer",
            "mlp": "the paper's: flatten (pooled to 8 x 8) + a two-layer MLP (256)",
        },
    )
    loss: str = option(
        "bce_dice",
        help="Mask loss: {choices}.",
        choices={"bce_dice": "on the whole RoI", "point": "BCE + dice on sampled points"},
    )
    point_targets: str = option(
        "cache",
        help="point loss: where the points' targets are read: {choices}.",
        choices={
            "cache": "the cached GT crop at its stored size (extract --target-size), PointRend's",
            "roi": "the crop first resized to M x M (a reweighted BCE on that grid)",
        },
    )
    points: int = option(1024, low=1, help="point loss: N sampled points per mask.")
    oversample: float = option(3.0, low=1, help="point loss: k, candidates = k * N random points.")
    importance: float = option(
        0.75, check=between(0, 1), help="point loss: beta, share of the N points taken as the most uncertain."
    )


@dataclass(frozen=True)
class TrainConfig:
    """Stage 2: optimisation. Defaults follow the paper's recipe (design §5, docs/design.md)."""

    steps: int = option(2000, low=1)
    batch_size: int = option(8, low=1)
    lr: float = option(1.5e-4, check=above(0))
    betas: tuple[float, float] = option(
        (0.9, 0.999),
        check=lambda v: (
            None if len(v) == 2 and not each(between(0, 1, open_high=True))(v) else "must be two numbers in [0, 1)"
        ),
    )
    weight_decay: float = option(5e-5, low=0)
    lr_drops: tuple[float, ...] = option(
        (0.9, 0.95), check=each(between(0, 1, open_low=True))
    )  # lr x0.1 at these fractions
    grad_clip: float = option(1.0, low=0)
    min_iou: float = option(0.5, check=between(0, 1))  # a query trains on the GT it overlaps most if box IoU >= this
    bce_weight: float = option(1.0, low=0)
    dice_weight: float = option(1.0, low=0)
    seed: int = option(0, low=0)
    # cache-reading processes (overlap reads with compute and each other); default: for this machine
    num_workers: int = option(machine_workers(), low=0)
    checkpoint_every: int = option(500, low=1)
    log_every: int = option(25, low=1)
    device: str = option("auto", check=device_name)
    amp: str = option("off", choices=AMP_CHOICES)  # autocast of the head's forward and loss; fp16 adds a grad scaler
    eval_every: int = option(0, low=0)  # val segm AP every N steps and at the end, best.pt kept (0 = never)
    tensorboard: bool = option(False, check=anything)  # scalars in RUN/tensorboard/ (pip install mfcache[tensorboard])
    # learn masks from these dataset categories only (names; () = all): queries matched to another category's GT
    # instance are left out of the loss, neither positives nor negatives (mfcache/stages/categories.py)
    categories: tuple[str, ...] = option((), check=distinct_names)


@dataclass(frozen=True)
class EvalConfig:
    """Stage 3: turning head outputs into COCO results."""

    mask_threshold: float = option(0.5, check=between(0, 1, open_low=True, open_high=True))
    batch_size: int = option(8, low=1)
    max_detections: int = option(100, low=1)
    amp: str = option("off", choices=AMP_CHOICES)  # autocast of the head's forward
    mask_prob_at: str = option(
        "box",
        help="head.scoring = mask_prob: where the mean probability of the mask's pixels > 0.5 is taken: {choices}.",
        choices={
            "box": "on the M x M grid inside the box",
            "image": "on the mask pasted into the original image, the paper's",
        },
    )


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
        if isinstance(value, str) and typing.get_args(annotation) == (str, ...):  # --set train.categories=a,b
            value = [v.strip() for v in value.split(",")] if value.strip() else []
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
            raise MfcacheError(f"`overrides` expects head.KEY=VALUE, train.KEY=VALUE or eval.KEY=VALUE, got {item!r}")
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


def resolve_run_config(
    head: str | None = None, overrides: list[str] | None = None, base: RunConfig | None = None
) -> RunConfig:
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


def choices(cls) -> dict[str, tuple]:
    """``{field: allowed values}`` of the fields of config class ``cls`` that have choices."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(cls) if f.metadata["choices"] is not None}


# every field of every config has a check (tests/guarantees/test_meaningful_runs.py asserts it)
RANGES: dict[type, dict[str, Check]] = {
    cls: {f.name: f.metadata["check"] for f in dataclasses.fields(cls)}
    for cls in (ExtractConfig, HeadConfig, TrainConfig, EvalConfig)
}
HEAD_CHOICES = choices(HeadConfig)  # the heads builder (mfcache/heads) composes exactly these
SECTIONS = {ExtractConfig: "extract", HeadConfig: "head", TrainConfig: "train", EvalConfig: "eval"}


def config_problems(config) -> list[str]:
    """One line per field of ``config`` (a :class:`RunConfig` or one of its sections, or an
    :class:`ExtractConfig`) whose value is out of range, each naming the field by its key in
    backquotes (:mod:`mfcache.errors`), e.g. "`train.steps` must be >= 1, got 0"."""
    if isinstance(config, RunConfig):
        return [p for part in (config.head, config.train, config.eval) for p in config_problems(part)]
    section, problems = SECTIONS[type(config)], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = RANGES[type(config)][f.name](value)
        if problem:
            problems.append(f"`{section}.{f.name}` {problem}, got {value!r}")
    if isinstance(config, TrainConfig) and config.bce_weight == 0 and config.dice_weight == 0:
        problems.append("`train.bce_weight` and `train.dice_weight` are both 0: the head would learn nothing")
    return problems


def check_config(config) -> None:
    """Raise :class:`MfcacheError` listing every out-of-range field, one line each
    (:func:`config_problems`)."""
    problems = config_problems(config)
    if problems:
        raise MfcacheError("\n".join(problems))


# --- resuming a run: which fields may change ---

# Fields a resumed run may change: how long it trains (train.steps; the lr schedule is that of
# the new length from the resumed step on) and how it runs, never what it learns from.
RESUMABLE = (
    "train.steps",
    "train.num_workers",
    "train.device",
    "train.checkpoint_every",
    "train.log_every",
    "train.eval_every",
    "train.tensorboard",
)


def _flat(config: RunConfig) -> dict[str, object]:
    return {f"{section}.{k}": v for section, values in config.to_dict().items() for k, v in values.items()}


def resume_config(
    stored: RunConfig,
    *,
    at_step: int,
    run: str | Path,
    requested: RunConfig | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """The configuration a run resumed at step ``at_step`` continues with: ``requested`` (a
    whole configuration, e.g. from ``--head``), else the ``stored`` one with ``overrides``
    (``--set`` strings) applied. Raises naming every changed field outside :data:`RESUMABLE`,
    or a ``train.steps`` below the step the run already reached."""
    config = requested if requested is not None else resolve_run_config(None, overrides, base=stored)
    old, new = _flat(stored), _flat(config)
    changed = [k for k in new if new[k] != old.get(k) and k not in RESUMABLE]
    if changed:
        what = ", ".join(f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in changed)
        raise MfcacheError(
            f"{run} was trained with another configuration: {what}; resume it without "
            f"`train.config`/`overrides` (only {', '.join(RESUMABLE)} may change)"
        )
    if config.train.steps < at_step:
        raise MfcacheError(
            f"{run} is already at step {at_step}: train.steps={config.train.steps} would end "
            "before it (use a larger train.steps to extend the run)"
        )
    return config
