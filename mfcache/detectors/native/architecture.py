"""What a checkpoint's tensors say about its architecture, and the spec options resolved
against it.

``resolve_options(family, options, state, where)``: ``options`` are the spec's typed
architecture options, ``state`` the checkpoint's state dict under native names
(:func:`~mfcache.detectors.native.checkpoint.rename_keys`). Every option the tensors fix is
taken from them; an option the spec gives wins, and one that contradicts the tensors is one
``MfcacheError`` naming the tensor and its shape. Read from the tensors:

- ``backbone``: ResNet 18/34/50/101 from the block counts of layer1..4 and bottleneck or
  basic blocks; Swin tiny/small/base/large from the patch embedding width, the stage depths
  and the heads (the bias tables' columns);
- ``window`` (Swin): ``relative_position_bias_table`` is ``[(2w - 1)^2, heads]``
  (169 rows: window 7, H-DETR's Swin-L; 529: window 12, DINO's);
- ``num_feature_levels`` and ``d_model`` from ``transformer.level_embed [L, D]``,
  ``backbone_levels`` from the 1x1 input projections, ``enc_layers`` / ``dec_layers`` from
  the layer counts, ``dim_feedforward`` from the encoder's ``linear1``;
- ``enc_n_points`` / ``dec_n_points``: ``attention_weights`` has ``heads x levels x points``
  rows, split with ``nheads`` (the spec's, or 8): no tensor gives the number of heads;
- ``num_classes`` from ``class_embed.0``;
- H-DETR: ``two_stage`` (``transformer.enc_output``), ``box_refine`` (two-stage, or box heads
  hung on the decoder), ``mixed_selection`` (a two-stage model with ``query_embed``), and the
  query counts: ``query_embed`` has one-to-one + one-to-many rows, split with ``num_queries``
  (the spec's, or 300) — a two-stage model without mixed selection has no query tensor, so its
  ``num_queries`` is the spec's (300 by default; the n1800 configs need ``num_queries=1800``);
- DINO: ``num_queries`` (``transformer.tgt_embed``), ``dn_labelbook_size`` (``label_enc`` rows - 1).

Not readable: ``nheads``, ``dilation`` (DC5 has the same weights), and the resize rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from mfcache.detectors.native.detector import NativeConfig
from mfcache.detectors.native.swin import SWINS, window_of
from mfcache.errors import MfcacheError

BODY = "backbone.0.body."
RESNET_BLOCKS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
}
DEFAULT_ONE2ONE = 300  # H-DETR's num_queries_one2one in every released config but n900 / n1800


@dataclass(frozen=True)
class Reading:
    """An option's value as the checkpoint fixes it, and the tensor that says so."""

    value: object
    because: str


def _shape(t: Tensor) -> str:
    return f"[{', '.join(map(str, t.shape))}]"


def _counts(state: dict[str, Tensor], pattern: str) -> dict[int, int]:
    """{group: number of indices} over keys matching ``pattern`` (groups ``(\\d+)`` then ``(\\d+)``)."""
    found: dict[int, set[int]] = {}
    for key in state:
        m = re.match(pattern, key)
        if m:
            found.setdefault(int(m[1]), set()).add(int(m[2]))
    return {g: len(v) for g, v in found.items()}


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """Number of distinct ``<prefix><i>.`` indices."""
    return len({int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _backbone(state: dict[str, Tensor]) -> dict[str, Reading]:
    embed = state.get(BODY + "patch_embed.proj.weight")
    if embed is not None:
        depths = _counts(state, re.escape(BODY) + r"layers\.(\d+)\.blocks\.(\d+)\.")
        tables = [state.get(f"{BODY}layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(4)]
        if len(depths) != 4 or any(t is None for t in tables):
            return {}
        key = (int(embed.shape[0]), tuple(depths[i] for i in range(4)), tuple(int(t.shape[1]) for t in tables))
        out = {}
        name = next((n for n, (dim, d, h, _) in SWINS.items() if (dim, d, h) == key), None)
        if name is not None:
            out["backbone"] = Reading(
                name, f"a Swin with embed_dim {key[0]}, depths {list(key[1])}, heads {list(key[2])} ({name})"
            )
        window = window_of(int(tables[0].shape[0]))
        if window is not None:
            out["window"] = Reading(
                window,
                f"{BODY}layers.0.blocks.0.attn.relative_position_bias_table is {_shape(tables[0])}: window {window}",
            )
        return out
    if BODY + "conv1.weight" in state:
        blocks = _counts(state, re.escape(BODY) + r"layer(\d)\.(\d+)\.")
        bottleneck = BODY + "layer1.0.conv3.weight" in state
        name = RESNET_BLOCKS.get((tuple(blocks.get(i, 0) for i in range(1, 5)), bottleneck))
        if name is not None:
            kind = "bottleneck" if bottleneck else "basic"
            return {
                "backbone": Reading(name, f"a ResNet with {[blocks[i] for i in range(1, 5)]} {kind} blocks ({name})")
            }
    return {}


def _transformer(state: dict[str, Tensor], nheads: int) -> dict[str, Reading]:
    out: dict[str, Reading] = {}
    level_embed = state.get("transformer.level_embed")
    if level_embed is None or level_embed.dim() != 2:
        return out
    levels, d = (int(n) for n in level_embed.shape)
    because = f"transformer.level_embed is {_shape(level_embed)}"
    out["num_feature_levels"] = Reading(levels, because)
    out["d_model"] = Reading(d, because)
    projs = [state.get(f"input_proj.{i}.0.weight") for i in range(levels)]
    if all(p is not None for p in projs):
        one_by_one = sum(1 for p in projs if p.shape[-1] == 1)
        out["backbone_levels"] = Reading(one_by_one, f"{one_by_one} of the input_proj.N.0 convolutions are 1x1")
    for option, prefix in (
        ("enc_layers", "transformer.encoder.layers."),
        ("dec_layers", "transformer.decoder.layers."),
    ):
        n = _count(state, prefix)
        if n:
            out[option] = Reading(n, f"the checkpoint has {n} {prefix}N")
    linear1 = state.get("transformer.encoder.layers.0.linear1.weight")
    if linear1 is not None:
        out["dim_feedforward"] = Reading(
            int(linear1.shape[0]), f"transformer.encoder.layers.0.linear1.weight is {_shape(linear1)}"
        )
    for option, key in (
        ("enc_n_points", "transformer.encoder.layers.0.self_attn.attention_weights.weight"),
        ("dec_n_points", "transformer.decoder.layers.0.cross_attn.attention_weights.weight"),
    ):
        weights = state.get(key)
        if weights is not None and weights.shape[0] % (nheads * levels) == 0:
            points = int(weights.shape[0]) // (nheads * levels)
            out[option] = Reading(
                points, f"{key} is {_shape(weights)} = {nheads} heads x {levels} levels x {points} points"
            )
    for key in ("class_embed.0.weight", "transformer.decoder.class_embed.0.weight"):
        if key in state:
            out["num_classes"] = Reading(int(state[key].shape[0]), f"{key} is {_shape(state[key])}")
            break
    return out


def _hdetr(state: dict[str, Tensor]) -> dict[str, Reading]:
    two_stage = "transformer.enc_output.weight" in state
    out = {
        "two_stage": Reading(
            two_stage,
            "the checkpoint "
            + ("has" if two_stage else "has no")
            + " transformer.enc_output (the two-stage proposal head)",
        )
    }
    on_decoder = any(k.startswith("transformer.decoder.bbox_embed.") for k in state)
    out["box_refine"] = Reading(
        two_stage or on_decoder,
        "the checkpoint "
        + ("is two-stage" if two_stage else "has " + ("" if on_decoder else "no ") + "transformer.decoder.bbox_embed.N")
        + " (box refinement hangs the box heads on the decoder)",
    )
    embed = state.get("query_embed.weight")
    if two_stage:
        out["mixed_selection"] = Reading(
            embed is not None,
            "a two-stage checkpoint "
            + ("with" if embed is not None else "without")
            + " query_embed.weight (the content queries of mixed selection)",
        )
    if embed is not None:
        out["query_rows"] = Reading(
            int(embed.shape[0]), f"query_embed.weight is {_shape(embed)} (one-to-one + one-to-many queries)"
        )
    return out


def _dino(state: dict[str, Tensor]) -> dict[str, Reading]:
    out = {}
    if (tgt := state.get("transformer.tgt_embed.weight")) is not None:
        out["num_queries"] = Reading(int(tgt.shape[0]), f"transformer.tgt_embed.weight is {_shape(tgt)}")
    if (label_enc := state.get("label_enc.weight")) is not None:
        # the denoising label table is training-only; its size is whatever the checkpoint has
        out["dn_labelbook_size"] = Reading(int(label_enc.shape[0]) - 1, f"label_enc.weight is {_shape(label_enc)}")
    return out


def read_architecture(family: str, state: dict[str, Tensor], nheads: int) -> dict[str, Reading]:
    """The options the tensors fix ({option: Reading}); H-DETR adds ``query_rows``."""
    family_part = _hdetr(state) if family == "hdetr" else _dino(state)
    return {**_backbone(state), **_transformer(state, nheads), **family_part}


def _show(value: object) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def _split_queries(options: dict, rows: Reading, where: str) -> dict:
    """H-DETR's one-to-one / one-to-many counts from ``query_embed``'s rows."""
    q, o2m = options.get("num_queries"), options.get("num_queries_one2many")
    if q is not None and o2m is not None and q + o2m != rows.value:
        raise MfcacheError(
            f"{where}: num_queries={q} + num_queries_one2many={o2m} = {q + o2m} contradicts the "
            f"checkpoint: {rows.because}"
        )
    if q is None:
        q = rows.value - o2m if o2m is not None else min(DEFAULT_ONE2ONE, rows.value)
    if not 0 < q <= rows.value:
        raise MfcacheError(f"{where}: num_queries={q} does not fit the checkpoint: {rows.because}")
    return {**options, "num_queries": q, "num_queries_one2many": rows.value - q}


def resolve_options(
    family: str, options: dict, state: dict[str, Tensor], where: str, given_as: dict[str, str] | None = None
) -> dict:
    """The spec's options completed from the checkpoint; an option that contradicts it is an error.
    ``given_as`` names how an option was given when not by itself (``num_classes``: a labels file)."""
    read = read_architecture(family, state, options.get("nheads", NativeConfig.nheads))
    if "backbone" not in read and "backbone" not in options:
        first = next((k for k in state if k.startswith("backbone.0.")), None)
        if first is not None:
            raise MfcacheError(
                f"{where}: the checkpoint's backbone ({first}, ...) is none that mfcache builds "
                "(ResNet 18/34/50/101, Swin tiny/small/base/large)"
            )
    out = dict(options)
    for key, reading in read.items():
        if key == "query_rows":
            continue
        if key in options and options[key] != reading.value:
            given = (given_as or {}).get(key, f"option {key}={_show(options[key])}")
            raise MfcacheError(f"{where}: {given} contradicts the checkpoint: {reading.because}")
        out.setdefault(key, reading.value)
    if "query_rows" in read:
        out = _split_queries(out, read["query_rows"], where)
    return out
