"""Key -> shape manifests of the released H-DETR and DINO configurations, built by the
original repositories' own model code with random weights.

Each manifest (``<out>/<family>_<name>.json``) holds the state-dict table of one
architecture, the config files that build it, and the architecture arguments they give:

    {"family": "hdetr", "source": "HDETR/H-Deformable-DETR@<commit>",
     "configs": ["configs/.../x.sh", ...], "arguments": {"backbone": "swin_large", ...},
     "state_dict": {"backbone.0.body.layers.0.blocks.0.attn.relative_position_bias_table": [169, 6], ...}}

Config files that build the same table from the same architecture arguments (they differ in
epochs, loss weights, weight decay, drop path...) share one manifest. The tests load every
manifest into mfcache's native models (``tests/detectors/test_native_released.py``).

How the shipped manifests were made (the originals are read, never copied into mfcache):

    git clone https://github.com/HDETR/H-Deformable-DETR /tmp/orig/hdetr    # f58ceb1
    git clone https://github.com/IDEA-Research/DINO /tmp/orig/dino          # faa8520
    python tools/released_manifests.py hdetr /tmp/orig/hdetr --source HDETR/H-Deformable-DETR@f58ceb1...
    python tools/released_manifests.py dino /tmp/orig/dino --source IDEA-Research/DINO@faa8520...

Only what constructing the models needs is provided: the compiled deformable-attention op,
timm, mmcv and mmdet are stubbed (their layers carry no weights, or only initialise them),
pretrained weights are never loaded, and every model is built on the ``meta`` device (shapes
without storage), so the script needs torch, torchvision and scipy only.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import shlex
import sys
import types
import warnings
from pathlib import Path

import torch
from torch import nn

# Architecture arguments of each family: what a manifest records (everything else in the
# configs is training only).
HDETR_ARGS = (
    "backbone",
    "dilation",
    "num_feature_levels",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "hidden_dim",
    "nheads",
    "enc_n_points",
    "dec_n_points",
    "with_box_refine",
    "two_stage",
    "mixed_selection",
    "num_queries_one2one",
    "num_queries_one2many",
)
DINO_ARGS = (
    "backbone",
    "dilation",
    "num_feature_levels",
    "return_interm_indices",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "hidden_dim",
    "nheads",
    "enc_n_points",
    "dec_n_points",
    "num_queries",
    "num_classes",
    "dn_labelbook_size",
    "two_stage_type",
    "dec_pred_class_embed_share",
    "dec_pred_bbox_embed_share",
)

# DINO's model zoo has a 5-scale Swin-L checkpoint but no config file for it: it is the Swin-L
# config with the 5-scale config's two architecture settings (DINO_5scale.py vs DINO_4scale.py).
DINO_VARIANTS = (
    ("config/DINO/DINO_4scale.py", {}),
    ("config/DINO/DINO_5scale.py", {}),
    ("config/DINO/DINO_4scale_swin.py", {}),
    ("config/DINO/DINO_4scale_swin.py", {"num_feature_levels": 5, "return_interm_indices": [0, 1, 2, 3]}),
    ("config/DINO/DINO_4scale_convnext.py", {}),
)


# ---------------------------------------------------------------------------- stubs
def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


class _DropPath(nn.Module):
    """timm's DropPath holds no weights; identity is all construction needs."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()

    def forward(self, x):
        return x


def install_stubs() -> None:
    """Modules the originals import that are not needed to build a model."""
    _module("MultiScaleDeformableAttention")  # the compiled CUDA op: used in forward only
    layers = _module(
        "timm.models.layers",
        DropPath=_DropPath,
        to_2tuple=lambda x: (x, x),
        trunc_normal_=lambda tensor, std=1.0, **_: nn.init.trunc_normal_(tensor, std=std),
    )
    _module("timm.models", layers=layers)
    _module("timm", models=sys.modules["timm.models"])
    _module("mmcv_custom", load_checkpoint=lambda *a, **k: None)  # H-DETR: pretrained Swin loading
    _module("mmdet.utils", get_root_logger=lambda *a, **k: None)
    _module("mmdet", utils=sys.modules["mmdet.utils"])


def _function(path: Path, name: str, namespace: dict):
    """One top-level function of a source file, without importing the rest of the file."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _built(build, args) -> nn.Module:
    """``build(args)[0]`` on the ``meta`` device, or on the CPU where construction reads values
    (Swin's drop-path schedule calls ``.item()``)."""
    try:
        with torch.device("meta"):
            return build(args)[0]
    except RuntimeError:
        return build(args)[0]


def _no_pretrained_weights() -> None:
    """Both repos build torchvision ResNets with ``pretrained=is_main_process()``."""
    import util.misc

    util.misc.is_main_process = lambda: False


# ---------------------------------------------------------------------------- H-DETR
def hdetr_config_args(script: Path) -> list[str]:
    """The ``main.py`` arguments of one config script (``--output_dir``, the pretrained
    backbone path and shell variables dropped)."""
    text = script.read_text().replace("\\\n", " ")
    command = next(line for line in text.splitlines() if "main.py" in line)
    tokens = shlex.split(command.split("main.py", 1)[1])
    out, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif token in ("--output_dir", "--pretrained_backbone_path"):
            skip = True
        elif not token.startswith("${"):
            out.append(token)
    return out


def hdetr_models(repo: Path):
    """Yield (config path, architecture arguments, state-dict table) for every config script."""
    parser = _function(repo / "main.py", "get_args_parser", {"argparse": argparse, "np": __import__("numpy")})()
    _no_pretrained_weights()
    from models.deformable_detr import build

    for script in sorted((repo / "configs").rglob("*.sh")):
        args = parser.parse_args(hdetr_config_args(script))
        args.pretrained_backbone_path, args.device = None, "cpu"
        model = _built(build, args)
        yield str(script.relative_to(repo)), {k: getattr(args, k) for k in HDETR_ARGS}, model.state_dict()


# ---------------------------------------------------------------------------- DINO
def _config_file(path: Path) -> dict:
    """A DINO config file's settings (its ``_base_`` files first), as DINO's SLConfig reads them."""
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    settings: dict = {}
    for base in namespace.get("_base_", []):
        settings.update(_config_file(path.parent / base))
    settings.update({k: v for k, v in namespace.items() if not k.startswith("_")})
    return settings


def dino_models(repo: Path):
    """Yield (config path [+ overrides], architecture arguments, state-dict table) per variant."""
    parser = _function(repo / "main.py", "get_args_parser", {"argparse": argparse, "DictAction": None})
    _no_pretrained_weights()
    import models.dino.backbone as backbone
    from models.dino.dino import build_dino

    build_convnext = backbone.build_convnext
    backbone.build_convnext = lambda modelname, pretrained, **kw: build_convnext(modelname, False, **kw)
    for config, overrides in DINO_VARIANTS:
        args = parser().parse_args(["-c", config, "--device", "cpu"])
        for key, value in {**_config_file(repo / config), **overrides}.items():
            setattr(args, key, value)
        if args.backbone.startswith("convnext"):  # read (never used) where Swin would load weights
            args.backbone_dir = None
        model = _built(build_dino, args)
        changed = "&".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in overrides.items())
        yield config + (f"?{changed}" if changed else ""), {k: getattr(args, k) for k in DINO_ARGS}, model.state_dict()


# ---------------------------------------------------------------------------- manifests
def manifest_name(family: str, a: dict) -> str:
    """A short file name from the architecture arguments, e.g. ``hdetr_swin_large_4scale_two_stage_mqs_q300_o2m1500``."""
    backbone = a["backbone"].replace("resnet", "r").lower()
    parts = [family, backbone, f"{a['num_feature_levels']}scale"]
    if a.get("dilation"):
        parts.append("dc5")
    if family == "hdetr":
        parts.append("two_stage" if a["two_stage"] else "one_stage")
        if a["with_box_refine"] and not a["two_stage"]:
            parts.append("refine")
        if a["mixed_selection"]:
            parts.append("mqs")
        parts.append(f"q{a['num_queries_one2one']}")
        if a["num_queries_one2many"]:
            parts.append(f"o2m{a['num_queries_one2many']}")
    return "_".join(parts)


def write_manifests(family: str, repo: Path, out: Path, source: str) -> list[Path]:
    warnings.simplefilter("ignore")
    install_stubs()
    sys.path.insert(0, str(repo))
    models = hdetr_models(repo) if family == "hdetr" else dino_models(repo)
    groups: dict[str, dict] = {}
    for config, arguments, state in models:
        table = {k: list(v.shape) for k, v in state.items()}
        params = sum(math.prod(s) for s in table.values())
        name = manifest_name(family, arguments)
        entry = groups.setdefault(
            name,
            {
                "family": family,
                "source": source,
                "configs": [],
                "arguments": arguments,
                "parameters": params,
                "state_dict": table,
            },
        )
        if (entry["arguments"], entry["state_dict"]) != (arguments, table):
            raise SystemExit(f"{config} and {entry['configs'][0]} share the name {name} but not the model")
        entry["configs"].append(config)
        print(f"{name:60s} {params / 1e6:7.1f}M  {config}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, entry in groups.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps(entry, indent=0, separators=(",", ":")) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=("hdetr", "dino"))
    parser.add_argument("repo", type=Path, help="a checkout of the original repository")
    parser.add_argument("--source", required=True, help="owner/name@commit of that checkout (recorded)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests" / "fixtures" / "released")
    args = parser.parse_args()
    paths = write_manifests(args.family, args.repo.resolve(), args.out, args.source)
    print(f"{len(paths)} manifests in {args.out}")


if __name__ == "__main__":
    main()
