"""Every released H-DETR and DINO configuration loads strictly through the spec the docs give
(``docs/detectors.md``, "Released checkpoints"; the README's short table names the same specs).

``tests/fixtures/released/*.json`` are the key -> shape tables of the originals' models, built by
the original repositories' code (``tools/released_manifests.py``), with the config files that
build each and their architecture arguments. Each test writes a checkpoint in the released
format (``torch.save({"model": state_dict, "args": Namespace, ...})``) whose tensors have those
shapes, loads it with the docs table's spec (``hdetr:FILE?...`` / ``dino:FILE?...``), and
compares the model it built with the original arguments. Tensors are zero-stride views of one
element and the native model is built on the ``meta`` device: a Swin-L model (~220M
parameters) loads in about a second, with no weights allocated.
"""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from mfcache.detectors import load_detector
from mfcache.errors import MfcacheError
from tests.helpers import ROOT

MANIFESTS = {
    p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "tests" / "fixtures" / "released").glob("*.json"))
}
TABLE_PAGE, TABLE_SECTION = ROOT / "docs" / "detectors.md", "### Released checkpoints"

# The originals' backbone arguments -> (native backbone, window), from their backbone code:
# H-DETR models/backbone.py builds every Swin with window 7 (swin_large: the 224 / 22k model),
# DINO's swin_L_384_22k has window 12.
ORIGINAL_BACKBONES = {
    "resnet50": ("resnet50", 0),
    "resnet101": ("resnet101", 0),
    "swin_tiny": ("swin_tiny", 7),
    "swin_small": ("swin_small", 7),
    "swin_large": ("swin_large", 7),
    "swin_L_384_22k": ("swin_large", 12),
}

pytestmark = pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")


def docs_table() -> dict[str, str]:
    """{manifest name: the spec cell (``hdetr:CKPT?...``, or the reason it does not load)} of the docs' table."""
    section = TABLE_PAGE.read_text().split(TABLE_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \|.*\| ([^|]+) \|$", line)
        if m:
            spec = m[2].strip()
            rows[m[1]] = spec[1:-1] if spec.startswith("`") else spec
    return rows


def save_released_checkpoint(path: Path, manifest: dict) -> None:
    """A checkpoint as the originals save it, every tensor a zero-stride view of one element."""
    one = torch.zeros(1)
    state = {key: one.expand(shape) if shape else one[0] for key, shape in manifest["state_dict"].items()}
    torch.save({"model": state, "args": argparse.Namespace(**manifest["arguments"]), "epoch": 11}, path)


def load(spec: str, path: Path):
    with torch.device("meta"):  # shapes only: no weights allocated
        return load_detector(spec.replace("CKPT", str(path)), device="meta")


def expected_config(family: str, a: dict) -> dict:
    """The native config the original arguments describe."""
    backbone, window = ORIGINAL_BACKBONES[a["backbone"]]
    out = {
        "backbone": backbone,
        "dilation": a["dilation"],
        "num_feature_levels": a["num_feature_levels"],
        "enc_layers": a["enc_layers"],
        "dec_layers": a["dec_layers"],
        "dim_feedforward": a["dim_feedforward"],
        "d_model": a["hidden_dim"],
        "nheads": a["nheads"],
        "enc_n_points": a["enc_n_points"],
        "dec_n_points": a["dec_n_points"],
    }
    if family == "hdetr":
        out.update(
            backbone_levels=3 if a["num_feature_levels"] > 1 else 1,
            two_stage=a["two_stage"],
            box_refine=a["with_box_refine"],
            num_queries=a["num_queries_one2one"],
            num_classes=91,
        )
        if a["two_stage"]:
            out["mixed_selection"] = a["mixed_selection"]
        if not a["two_stage"] or a["mixed_selection"]:  # one-to-many queries only size query_embed
            out["num_queries_one2many"] = a["num_queries_one2many"]
    else:
        out.update(
            backbone_levels=len(a["return_interm_indices"]),
            num_queries=a["num_queries"],
            num_classes=a["num_classes"],
            dn_labelbook_size=a["dn_labelbook_size"],
        )
    return out, window


def test_docs_table_has_one_row_per_released_configuration():
    rows = docs_table()
    assert sorted(rows) == sorted(MANIFESTS)
    configs = [c for m in MANIFESTS.values() for c in m["configs"]]
    assert len(configs) == len(set(configs)) == 60 + 5  # H-DETR's configs/*.sh; DINO's 4 configs + 5-scale Swin-L


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_released_configuration_loads_strictly_with_the_documented_spec(tmp_path, name):
    manifest = MANIFESTS[name]
    family, spec = manifest["family"], docs_table()[name]
    path = tmp_path / "checkpoint.pth"
    save_released_checkpoint(path, manifest)
    if not spec.startswith(f"{family}:CKPT"):  # a configuration mfcache does not build: one clear error
        with pytest.raises(MfcacheError, match="backbone .* is none that mfcache builds"):
            load(f"{family}:CKPT", path)
        return
    model = load(spec, path)  # strict: any missing, unexpected or mis-shaped key is an error
    want, window = expected_config(family, manifest["arguments"])
    got = {k: getattr(model.cfg, k) for k in want}
    assert got == want
    if window:
        assert model.backbone[0].window == window
        assert all(
            block.attn.relative_position_bias_table.shape[0] == (2 * window - 1) ** 2
            for stage in model.backbone[0].body.layers
            for block in stage.blocks
        )
    stride = 16 if manifest["arguments"]["dilation"] else 32
    assert model.strides[model.cfg.backbone_levels - 1] == stride


def test_window7_swin_large_hdetr_loads_with_no_options(tmp_path):
    """The paper's detector: H-DETR Swin-L (window 7) needs no backbone option; DINO's Swin-L is window 12."""
    for name, window in (("hdetr_swin_large_4scale_two_stage_mqs_q300_o2m1500", 7), ("dino_swin_l_384_22k_4scale", 12)):
        path = tmp_path / f"{name}.pth"
        save_released_checkpoint(path, MANIFESTS[name])
        family = MANIFESTS[name]["family"]
        for spec in (f"{family}:CKPT", f"{family}:CKPT?backbone=swin_large", f"{family}:CKPT?window={window}"):
            model = load(spec, path)
            assert (model.cfg.backbone, model.backbone[0].window) == ("swin_large", window)
            assert model.c1_channels == 192 and model.strides == (8, 16, 32, 64)


@pytest.mark.parametrize(
    "option, message",
    [
        (
            "window=12",
            r"option window=12 contradicts the checkpoint: .*relative_position_bias_table is \[169, 6\]: window 7",
        ),
        ("backbone=swin_tiny", r"option backbone=swin_tiny contradicts the checkpoint: a Swin with embed_dim 192"),
        ("backbone=resnet50", r"option backbone=resnet50 contradicts the checkpoint: a Swin with embed_dim 192"),
        ("two_stage=0", r"option two_stage=0 contradicts the checkpoint: .*transformer\.enc_output"),
        (
            "num_feature_levels=5",
            r"option num_feature_levels=5 contradicts the checkpoint: transformer\.level_embed is \[4, 256\]",
        ),
        (
            "num_queries=900&num_queries_one2many=1500",
            r"900 \+ num_queries_one2many=1500 = 2400 contradicts the checkpoint: "
            r"query_embed\.weight is \[1800, 256\]",
        ),
    ],
)
def test_an_option_that_contradicts_the_checkpoint_is_one_error_line(tmp_path, option, message):
    path = tmp_path / "swin_l.pth"
    save_released_checkpoint(path, MANIFESTS["hdetr_swin_large_4scale_two_stage_mqs_q300_o2m1500"])
    with pytest.raises(MfcacheError, match=message) as info:
        load(f"hdetr:CKPT?{option}", path)
    assert "\n" not in str(info.value)


def test_dc5_keeps_the_last_level_at_stride_16():
    """``dilation=1`` (no tensor tells it): layer4 dilated, so the single level is 1/16 of the input."""
    from mfcache.detectors.native.backbone import build_backbone

    body = build_backbone("resnet50", (4,), dilation=True).eval()
    with torch.no_grad():
        c1, (c5,) = body(torch.zeros(1, 3, 96, 64))
    assert body.strides == [16] and tuple(c5.shape[-2:]) == (6, 4) and tuple(c1.shape[-2:]) == (24, 16)
    with pytest.raises(MfcacheError, match="dilation needs a bottleneck ResNet"):
        build_backbone("resnet18", (4,), dilation=True)


def test_the_readme_names_only_documented_specs():
    """The README's short table of released configurations gives specs the docs' table tests."""
    text = (ROOT / "README.md").read_text()
    section = text.split("**The paper's detectors as released.**", 1)[1].split("\n## ", 1)[0]
    specs = {m for m in re.findall(r"`((?:hdetr|dino):CKPT[^`]*)`", section)}
    assert specs and specs <= set(docs_table().values())
    assert "hdetr:CKPT?num_queries=900" in specs  # the paper's Swin-L n900 variant is named
