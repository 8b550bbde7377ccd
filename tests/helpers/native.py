"""Native H-DETR / DINO checkpoints for tests: tiny architectures, the published key layout and
random checkpoints in it, and the ``hdetr:``/``dino:`` specs naming them.

``published_keys`` is written from the original repos' module layout, independently of the
native modules, so a renamed or missing parameter in the native code fails the tests using it.
"""

import torch

from mfcache.detectors.native.checkpoint import random_state_dict

TINY = {
    "backbone": "resnet18",
    "d_model": 64,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 96,
    "enc_n_points": 2,
    "dec_n_points": 3,
}
HDETR_TINY = {**TINY, "num_queries": 20, "num_queries_one2many": 30}
DINO_TINY = {**TINY, "num_queries": 25}


# ----------------------------------------------------------------------------- published layout
def _resnet_keys(name: str) -> dict[str, tuple]:
    """torchvision ResNet trunk (no fc) with FrozenBatchNorm2d, under backbone.0.body."""
    bottleneck = name in ("resnet50", "resnet101")
    blocks = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[name]
    keys = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        keys.update({f"{prefix}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})

    bn("bn1", 64)
    inplanes = 64
    for li, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        out = width * (4 if bottleneck else 1)
        for bi in range(n):
            p = f"layer{li}.{bi}"
            if bottleneck:
                convs = [(inplanes, width, 1), (width, width, 3), (width, out, 1)]
            else:
                convs = [(inplanes, width, 3), (width, width, 3)]
            for ci, (cin, cout, k) in enumerate(convs, start=1):
                keys[f"{p}.conv{ci}.weight"] = (cout, cin, k, k)
                bn(f"{p}.bn{ci}", cout)
            if bi == 0 and (inplanes != out or li > 1):
                keys[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    return {f"backbone.0.body.{k}": v for k, v in keys.items()}


def _linear(prefix, cin, cout):
    return {f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)}


def _mlp(prefix, cin, hidden, cout, n):
    dims = [cin] + [hidden] * (n - 1) + [cout]
    out = {}
    for i in range(n):
        out.update(_linear(f"{prefix}.layers.{i}", dims[i], dims[i + 1]))
    return out


def _msda(prefix, d, levels, heads, points):
    return {
        **_linear(f"{prefix}.sampling_offsets", d, heads * levels * points * 2),
        **_linear(f"{prefix}.attention_weights", d, heads * levels * points),
        **_linear(f"{prefix}.value_proj", d, d),
        **_linear(f"{prefix}.output_proj", d, d),
    }


def _norm(prefix, d):
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def published_keys(family: str, o: dict) -> dict[str, tuple]:
    """Key -> shape of the original repos' state dict for options ``o`` (4-scale, C3-C5)."""
    d, ffn, levels, heads = o["d_model"], o["dim_feedforward"], 4, o["nheads"]
    k = o.get("num_classes", 91)
    channels = {"resnet18": (128, 256, 512), "resnet50": (512, 1024, 2048)}[o["backbone"]]
    keys = _resnet_keys(o["backbone"])
    for i, c in enumerate(channels):
        keys.update(
            {f"input_proj.{i}.0.weight": (d, c, 1, 1), f"input_proj.{i}.0.bias": (d,), **_norm(f"input_proj.{i}.1", d)}
        )
    keys.update(
        {"input_proj.3.0.weight": (d, channels[-1], 3, 3), "input_proj.3.0.bias": (d,), **_norm("input_proj.3.1", d)}
    )
    keys["transformer.level_embed"] = (levels, d)
    for i in range(o["enc_layers"]):
        p = f"transformer.encoder.layers.{i}"
        keys.update(
            {
                **_msda(f"{p}.self_attn", d, levels, heads, o["enc_n_points"]),
                **_norm(f"{p}.norm1", d),
                **_linear(f"{p}.linear1", d, ffn),
                **_linear(f"{p}.linear2", ffn, d),
                **_norm(f"{p}.norm2", d),
            }
        )
    for i in range(o["dec_layers"]):
        p = f"transformer.decoder.layers.{i}"
        keys.update(
            {
                **_msda(f"{p}.cross_attn", d, levels, heads, o["dec_n_points"]),
                **_norm(f"{p}.norm1", d),
                f"{p}.self_attn.in_proj_weight": (3 * d, d),
                f"{p}.self_attn.in_proj_bias": (3 * d,),
                **_linear(f"{p}.self_attn.out_proj", d, d),
                **_norm(f"{p}.norm2", d),
                **_linear(f"{p}.linear1", d, ffn),
                **_linear(f"{p}.linear2", ffn, d),
                **_norm(f"{p}.norm3", d),
            }
        )
    if family == "hdetr":  # two-stage + box refine + mixed selection
        num_pred = o["dec_layers"] + 1
        keys.update(
            {
                **_linear("transformer.enc_output", d, d),
                **_norm("transformer.enc_output_norm", d),
                **_linear("transformer.pos_trans", 2 * d, 2 * d),
                **_norm("transformer.pos_trans_norm", 2 * d),
                "query_embed.weight": (o["num_queries"] + o["num_queries_one2many"], d),
            }
        )
    else:
        num_pred = o["dec_layers"]
        keys.update(
            {
                **_mlp("transformer.decoder.ref_point_head", 2 * d, d, d, 2),
                **_norm("transformer.decoder.norm", d),
                "transformer.tgt_embed.weight": (o["num_queries"], d),
                **_linear("transformer.enc_output", d, d),
                **_norm("transformer.enc_output_norm", d),
                **_linear("transformer.enc_out_class_embed", d, k),
                **_mlp("transformer.enc_out_bbox_embed", d, d, 4, 3),
                "label_enc.weight": (o.get("dn_labelbook_size", 9) + 1, d),
            }
        )  # 9: not the default
    for i in range(num_pred):
        for prefix in ("", "transformer.decoder."):
            keys.update({**_linear(f"{prefix}class_embed.{i}", d, k), **_mlp(f"{prefix}bbox_embed.{i}", d, d, 4, 3)})
    return keys


def random_checkpoint(path, family: str, options: dict, *, seed: int = 0, drop: str | None = None) -> None:
    shapes = {k: v for k, v in published_keys(family, options).items() if k != drop}
    state = random_state_dict(shapes, seed)
    torch.save({"model": state, "epoch": 11}, path)


def spec(family: str, path, options: dict, **extra) -> str:
    return f"{family}:{path}?" + "&".join(f"{k}={v}" for k, v in {**options, **extra}.items())


def swin_keys(prefix: str, dim: int, depths, heads, window: int, out_indices=(1, 2, 3)) -> dict[str, tuple]:
    """Swin-Transformer-Object-Detection's SwinTransformer (ape=False, patch_norm=True)."""
    keys = {
        f"{prefix}patch_embed.proj.weight": (dim, 3, 4, 4),
        f"{prefix}patch_embed.proj.bias": (dim,),
        **_norm(f"{prefix}patch_embed.norm", dim),
    }
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = dim * 2**i
        for j in range(depth):
            p = f"{prefix}layers.{i}.blocks.{j}"
            keys.update(
                {
                    **_norm(f"{p}.norm1", c),
                    f"{p}.attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                    f"{p}.attn.relative_position_index": (window**2, window**2),
                    **_linear(f"{p}.attn.qkv", c, 3 * c),
                    **_linear(f"{p}.attn.proj", c, c),
                    **_norm(f"{p}.norm2", c),
                    **_linear(f"{p}.mlp.fc1", c, 4 * c),
                    **_linear(f"{p}.mlp.fc2", 4 * c, c),
                }
            )
        if i < 3:
            keys.update(
                {
                    f"{prefix}layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                    **_norm(f"{prefix}layers.{i}.downsample.norm", 4 * c),
                }
            )
    for i in out_indices:
        keys.update(_norm(f"{prefix}norm{i}", dim * 2**i))
    return keys
