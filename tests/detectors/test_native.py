"""Native H-DETR / DINO: checkpoint key sets, MSDA equivalence, and end-to-end extraction.

``published_keys`` (tests/helpers/native.py) is written from the original repos' module layout,
independently of the native modules, so a renamed or missing parameter in the native code fails here.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from mfcache.cache.reader import Cache
from mfcache.config import ExtractConfig
from mfcache.data.shapes import CATEGORIES, write_shapes_dataset
from mfcache.data.transforms import load_image, pad_batch, to_input
from mfcache.detectors import load_detector
from mfcache.detectors.native import COCO91_LABELS
from mfcache.errors import MfcacheError
from mfcache.ops.deformable_attention import MSDeformAttn, ms_deform_attn
from mfcache.stages.extract import extract
from tests.helpers.native import DINO_TINY, HDETR_TINY, published_keys, random_checkpoint, spec, swin_keys


# ----------------------------------------------------------------------------- key sets
def test_coco91_labels_follow_the_category_ids():
    assert len(COCO91_LABELS) == 91 and COCO91_LABELS.count("N/A") == 11
    assert COCO91_LABELS[1] == "person" and COCO91_LABELS[13] == "stop sign" and COCO91_LABELS[90] == "toothbrush"


@pytest.mark.parametrize("family", ["hdetr", "dino"])
def test_default_architecture_has_exactly_the_published_keys(family):
    from mfcache.detectors.native import Dino, DinoConfig, HDetr, HDetrConfig

    model = HDetr(HDetrConfig()) if family == "hdetr" else Dino(DinoConfig())
    options = {
        "backbone": "resnet50",
        "d_model": 256,
        "nheads": 8,
        "enc_layers": 6,
        "dec_layers": 6,
        "dim_feedforward": 2048,
        "enc_n_points": 4,
        "dec_n_points": 4,
        "num_queries": 300 if family == "hdetr" else 900,
        "num_queries_one2many": 1500,
        "dn_labelbook_size": 91,
    }
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = published_keys(family, options)
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert got == want


@pytest.mark.parametrize("family,options", [("hdetr", HDETR_TINY), ("dino", DINO_TINY)])
def test_checkpoint_loads_strictly_and_a_missing_key_is_named(tmp_path, family, options):
    path = tmp_path / "ckpt.pth"
    random_checkpoint(path, family, options)
    model = load_detector(spec(family, path, options))
    state = torch.load(path, weights_only=False)["model"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert model.info.family == family and model.info.label_names == COCO91_LABELS
    assert model.info.num_queries == options["num_queries"] and model.info.strides == (8, 16, 32, 64)

    dropped = "transformer.encoder.layers.0.self_attn.value_proj.weight"
    random_checkpoint(path, family, options, drop=dropped)
    with pytest.raises(MfcacheError, match=r"missing 1 \(" + dropped.replace(".", r"\.") + r"\)"):
        load_detector(spec(family, path, options))


def test_decoder_head_aliases_and_ddp_prefix_are_accepted(tmp_path):
    path = tmp_path / "ckpt.pth"
    random_checkpoint(path, "hdetr", HDETR_TINY)
    state = torch.load(path, weights_only=False)["model"]
    state = {f"module.{k}": v for k, v in state.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    torch.save({"model": state}, path)
    model = load_detector(spec("hdetr", path, HDETR_TINY))
    assert torch.equal(
        model.transformer.decoder.bbox_embed[0].layers[0].weight, state["module.bbox_embed.0.layers.0.weight"]
    )


def test_spec_errors_are_one_clear_line(tmp_path):
    path = tmp_path / "ckpt.pth"
    random_checkpoint(path, "hdetr", HDETR_TINY)
    with pytest.raises(MfcacheError, match="unknown option.*num_querys"):
        load_detector(spec("hdetr", path, HDETR_TINY, num_querys=3))
    # options the tensors fix must agree with them; the error names the tensor
    with pytest.raises(
        MfcacheError,
        match=r"20 \+ num_queries_one2many=10 = 30 contradicts the checkpoint: "
        r"query_embed\.weight is \[50, 64\]",
    ):
        load_detector(spec("hdetr", path, {**HDETR_TINY, "num_queries_one2many": 10}))
    with pytest.raises(MfcacheError, match="option two_stage=0 contradicts the checkpoint.*enc_output"):
        load_detector(spec("hdetr", path, HDETR_TINY, two_stage=0, box_refine=0))
    with pytest.raises(MfcacheError, match="option box_refine=0 contradicts the checkpoint"):
        load_detector(spec("hdetr", path, HDETR_TINY, box_refine=0))
    # no tensor gives the number of heads, only heads x levels x points: a wrong nheads shows
    # as points that disagree, or (where the product does not divide) as shapes
    with pytest.raises(MfcacheError, match=r"enc_n_points=2 contradicts.*\[32, 64\] = 8 heads x 4 levels x 1 points"):
        load_detector(spec("hdetr", path, {**HDETR_TINY, "nheads": 8}))
    no_points = {k: v for k, v in HDETR_TINY.items() if not k.endswith("_n_points")}
    with pytest.raises(MfcacheError, match=r"other shapes.*cross_attn\.sampling_offsets"):
        load_detector(spec("hdetr", path, {**no_points, "nheads": 8}))
    with pytest.raises(MfcacheError, match="not found"):
        load_detector(f"dino:{tmp_path / 'nope.pth'}")
    torch.save({"state_dict": {}}, path)
    with pytest.raises(MfcacheError, match="under 'model'"):
        load_detector(f"dino:{path}")


# ----------------------------------------------------------------------------- MSDA
def reference_msda(value, shapes, locations, weights):
    """Deformable DETR's ms_deform_attn_core_pytorch, with an explicit loop over heads too."""
    n, _, m, dh = value.shape
    _, q, _, num_levels, p, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes.tolist()], dim=1)
    out = value.new_zeros(n, q, m, dh)
    for lvl, (h, w) in enumerate(shapes.tolist()):
        for head in range(m):
            v = per_level[lvl][:, :, head].transpose(1, 2).reshape(n, dh, h, w)
            grid = 2 * locations[:, :, head, lvl] - 1  # [N, Q, P, 2]
            sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out[:, :, head] += (sampled * weights[:, None, :, head, lvl]).sum(-1).transpose(1, 2)
    return out.flatten(2)


class _Keep(torch.nn.Module):
    """A decoder layer that changes nothing: ``(output, *inputs) -> output``."""

    def forward(self, output, *_):
        return output


class _NoDelta(torch.nn.Module):
    """A box head predicting a zero refinement: ``[B, Q, D] -> [B, Q, 4]`` zeros."""

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], 4)


@pytest.mark.parametrize("family, unsigmoided", [("dino", 6.9073), ("hdetr", 7.6004)])
def test_box_refinement_uses_the_familys_inverse_sigmoid_epsilon(family, unsigmoided):
    """DINO refines boxes with ``inverse_sigmoid(x, eps=1e-3)`` (its util/misc.py), Deformable
    DETR and H-DETR with 1e-5; above 1 - 1e-3 they differ: 0.9995 -> 6.9073 vs 7.6004. With
    layers and box heads that change nothing, the second layer's reference is the first's
    passed through the family's inverse sigmoid and back."""
    from mfcache.detectors.native import Dino, DinoConfig, HDetr, HDetrConfig

    model = Dino(DinoConfig(**DINO_TINY)) if family == "dino" else HDetr(HDetrConfig(**HDETR_TINY))
    decoder = model.transformer.decoder
    decoder.layers = torch.nn.ModuleList([_Keep(), _Keep()])
    decoder.bbox_embed = torch.nn.ModuleList([_NoDelta(), _NoDelta()])
    references = torch.tensor([[[0.9995, 0.5, 0.3, 0.2]]])
    d = DINO_TINY["d_model"]
    _, used = decoder(torch.zeros(1, 1, d), torch.zeros(1, 1, d), references, None, None, torch.ones(1, 4, 2), None)
    torch.testing.assert_close(torch.logit(used[0, 0, 0].double()).item(), unsigmoided, atol=2e-3, rtol=0)
    torch.testing.assert_close(used[0, 0, 1:], references[0, 0, 1:])  # far from 0 and 1 the families agree


def test_msda_matches_per_level_reference_including_out_of_level_samples():
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[11, 14], [6, 7], [3, 4], [2, 2]])
    tokens = int(shapes.prod(1).sum())
    value = torch.randn(2, tokens, 4, 8, generator=gen, dtype=torch.float64)
    # many samples fall outside [0, 1]: they must read zeros, never a neighbouring level
    locations = torch.rand(2, 13, 4, 4, 3, 2, generator=gen, dtype=torch.float64) * 1.8 - 0.4
    weights = torch.rand(2, 13, 4, 4, 3, generator=gen, dtype=torch.float64)
    got = ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(got, reference_msda(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)


def test_msda_module_with_box_references_and_padding():
    torch.manual_seed(1)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).double()
    shapes = torch.tensor([[8, 6], [4, 3]])
    memory = torch.randn(1, 60, 32, dtype=torch.float64)
    pad = torch.zeros(1, 60, dtype=torch.bool)
    pad[:, 40:48] = True
    query = torch.randn(1, 5, 32, dtype=torch.float64)
    refs = torch.rand(1, 5, 2, 4, dtype=torch.float64)
    out = attn(query, refs, memory, shapes, pad)
    memory2 = memory.clone()
    memory2[pad] = 1e3  # padded tokens never contribute
    torch.testing.assert_close(attn(query, refs, memory2, shapes, pad), out)
    value = attn.value_proj(memory).masked_fill(pad[..., None], 0).view(1, 60, 4, 8)
    offsets = attn.sampling_offsets(query).view(1, 5, 4, 2, 3, 2)
    weights = attn.attention_weights(query).view(1, 5, 4, 6).softmax(-1).view(1, 5, 4, 2, 3)
    locations = refs[:, :, None, :, None, :2] + offsets / 3 * refs[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(out, attn.output_proj(reference_msda(value, shapes, locations, weights)))


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_native")
    write_shapes_dataset(root, num_train=2, num_val=1, seed=5)
    labels = root / "labels.json"
    labels.write_text(json.dumps(["N/A", *CATEGORIES]))  # index = shapes category id
    return root, labels


@pytest.mark.parametrize("family,options", [("hdetr", HDETR_TINY), ("dino", DINO_TINY)])
def test_extract_caches_what_the_detector_computes(tmp_path, two_images, family, options):
    root, labels = two_images
    path = tmp_path / f"{family}.pth"
    random_checkpoint(path, family, {**options, "num_classes": 1 + len(CATEGORIES)}, seed=2)
    detector_spec = spec(family, path, options, labels=labels, shortest_edge=128, longest_edge=192)
    summary = extract(
        detector=detector_spec,
        images=root / "train",
        annotations=root / "annotations" / "train.json",
        out=tmp_path / "cache",
        config=ExtractConfig(topk=10, num_workers=0, device="cpu", dtype="float32"),
        progress=False,
    )
    assert summary.written == 2
    split = Cache(tmp_path / "cache").split("train")
    record = split.read(0)
    assert record.queries.shape == (10, 64) and record.c1.shape[0] == 64  # ResNet-18 layer1

    model = load_detector(detector_spec)
    images = json.loads((root / "annotations" / "train.json").read_text())["images"]
    image = next(im for im in images if im["id"] == record.image_id)
    pixels = to_input(load_image(root / "train" / image["file_name"]), model.info.preprocess)
    batch, mask = pad_batch([pixels], model.info.preprocess)
    out = model(batch, mask)
    h, w = pixels.shape[1:]
    assert tuple(record.input_hw.tolist()) == (h, w)
    (hp, wp), (hv, wv) = out.spatial_shapes[0].tolist(), record.levels[0].shape[1:]
    finest = out.memory[0, : hp * wp].view(hp, wp, -1)[:hv, :wv].permute(2, 0, 1)
    torch.testing.assert_close(record.levels[0], finest, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(record.c1, out.c1[0, :, : -(-h // 4), : -(-w // 4)], rtol=1e-4, atol=1e-4)
    scores = out.logits[0].sigmoid().flatten().topk(10).values
    torch.testing.assert_close(record.scores, scores, rtol=1e-4, atol=1e-5)
    assert (record.boxes[:, 2:] >= record.boxes[:, :2]).all()
    assert split.label_to_category.tolist() == [-1, 1, 2, 3, 4, 5, 6]  # "N/A" maps to no category


# ----------------------------------------------------------------------------- cross-check
def _to_transformers_key(key: str) -> str | None:
    """Native (original-repo) name -> transformers DeformableDetrForObjectDetection name."""
    import re

    rules = [
        (r"^backbone\.0\.body\.conv1\.", "model.backbone.model.embedder.embedder.convolution."),
        (r"^backbone\.0\.body\.bn1\.", "model.backbone.model.embedder.embedder.normalization."),
        (
            r"^backbone\.0\.body\.layer(\d)\.(\d+)\.downsample\.0\.",
            lambda m: f"model.backbone.model.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.",
        ),
        (
            r"^backbone\.0\.body\.layer(\d)\.(\d+)\.downsample\.1\.",
            lambda m: f"model.backbone.model.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.",
        ),
        (
            r"^backbone\.0\.body\.layer(\d)\.(\d+)\.(conv|bn)(\d)\.",
            lambda m: (
                f"model.backbone.model.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}."
                + ("convolution." if m[3] == "conv" else "normalization.")
            ),
        ),
        (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.self_attn_layer_norm."),
        (r"^transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"model.encoder.layers.\1.mlp.fc\2."),
        (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.final_layer_norm."),
        (r"^transformer\.decoder\.layers\.(\d+)\.cross_attn\.", r"model.decoder.layers.\1.encoder_attn."),
        (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"model.decoder.layers.\1.encoder_attn_layer_norm."),
        (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"model.decoder.layers.\1.self_attn.o_proj."),
        (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"model.decoder.layers.\1.self_attn_layer_norm."),
        (r"^transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", r"model.decoder.layers.\1.mlp.fc\2."),
        (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
        (r"^query_embed\.", "model.query_position_embeddings."),
        (r"^transformer\.", "model."),
        (r"^input_proj\.", "model.input_proj."),
    ]
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


@pytest.mark.parametrize("two_stage,box_refine", [(True, True), (False, True)])
def test_hdetr_without_mixed_selection_equals_transformers_deformable_detr(two_stage, box_refine):
    """Deformable DETR (two-stage / box refinement) is H-DETR without mixed selection
    and one-to-many queries; transformers' independent implementation must agree."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    from mfcache.detectors.native import HDetr, HDetrConfig

    torch.manual_seed(0)
    native = HDetr(
        HDetrConfig(
            backbone="resnet18",
            d_model=64,
            nheads=4,
            enc_layers=2,
            dec_layers=2,
            dim_feedforward=96,
            enc_n_points=2,
            dec_n_points=3,
            num_classes=7,
            num_queries=20,
            num_queries_one2many=0,
            mixed_selection=False,
            two_stage=two_stage,
            box_refine=box_refine,
        )
    ).eval()
    with torch.no_grad():
        for p in native.parameters():
            p.normal_(0, 0.3 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1)
        for name, b in native.named_buffers():
            b.copy_(torch.rand_like(b) + 0.5 if name.endswith("running_var") else torch.randn_like(b) * 0.1)
    backbone = ResNetConfig(
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_n_points=2,
        decoder_n_points=3,
        num_queries=20,
        two_stage=two_stage,
        with_box_refine=box_refine,
        two_stage_num_proposals=20,
        num_labels=7,
    )
    hf = DeformableDetrForObjectDetection(config).eval()
    state = {}
    for key, value in native.state_dict().items():
        if key.endswith("self_attn.in_proj_weight") or key.endswith("self_attn.in_proj_bias"):
            kind = key.rsplit("_", 1)[1]
            base = _to_transformers_key(key.replace(f"in_proj_{kind}", "out_proj.x")).replace("o_proj.x", "")
            for proj, part in zip("qkv", value.chunk(3)):
                state[f"{base}{proj}_proj.{kind}"] = part
        else:
            state[_to_transformers_key(key)] = value
    hf_keys = set(hf.state_dict())
    assert sorted(hf_keys - set(state)) == [] and sorted(set(state) - hf_keys) == []
    hf.load_state_dict(state, strict=True)

    pixels = torch.randn(2, 3, 128, 128)
    mask = torch.ones(2, 128, 128, dtype=torch.bool)
    mask[1, 96:] = False  # the second image is 96 x 80, padded
    mask[1, :, 80:] = False
    pixels[~mask[:, None].expand(-1, 3, -1, -1)] = 0
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_mask=mask.long())
    out = native(pixels, mask)
    torch.testing.assert_close(out.memory, ref.encoder_last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.queries, ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    real_w = torch.tensor([128.0, 80.0]).view(2, 1)
    real_h = torch.tensor([128.0, 96.0]).view(2, 1)
    cx, cy, w, h = ref.pred_boxes.unbind(-1)
    expected = torch.stack(
        [(cx - w / 2) * real_w, (cy - h / 2) * real_h, (cx + w / 2) * real_w, (cy + h / 2) * real_h], -1
    )
    torch.testing.assert_close(out.boxes, expected, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- Swin
@pytest.mark.parametrize("family", ["hdetr", "dino"])
def test_swin_large_checkpoint_names_load(tmp_path, family):
    """Swin-L (window 12) under H-DETR's ``backbone.0.body.*`` and DINO's ``backbone.0.*``."""
    from mfcache.detectors.native import Dino, DinoConfig, HDetr, HDetrConfig

    with torch.device("meta"):  # shapes only: Swin-L has 195M parameters
        model = (
            HDetr(HDetrConfig(backbone="swin_large")) if family == "hdetr" else Dino(DinoConfig(backbone="swin_large"))
        )
    prefix = "backbone.0.body." if family == "hdetr" else "backbone.0."
    swin = swin_keys(prefix, 192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k.replace("backbone.0.", "backbone.0.body.", 1) if family == "dino" else k: v for k, v in swin.items()} == {
        k: v for k, v in got.items() if k.startswith("backbone.")
    }
    assert got["input_proj.0.0.weight"] == (256, 384, 1, 1) and got["input_proj.3.0.weight"] == (256, 1536, 3, 3)
    assert model.c1_channels == 192 and model.strides == (8, 16, 32, 64)
    from mfcache.detectors.native.checkpoint import map_state_dict

    expected = model.state_dict()
    state = {k: v for k, v in expected.items() if not k.startswith("backbone.")}
    state.update({k: torch.empty(v, device="meta") for k, v in swin.items()})
    mapped = map_state_dict(state, expected)  # the checkpoint key table, as load_weights applies it
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_swin_equals_torchvision_swin(monkeypatch):
    """Stage outputs match torchvision's independent Swin (v1) on the same weights, for a map
    large enough that torchvision keeps every shift (it drops shifts for maps <= one window)."""
    from torchvision.models.swin_transformer import SwinTransformer

    from mfcache.detectors.native import swin

    monkeypatch.setitem(swin.SWINS, "swin_micro", (32, (2, 2, 2, 2), (2, 2, 4, 4), 7))
    torch.manual_seed(0)
    ours = swin.SwinBody("swin_micro", (2, 3, 4)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    ref = SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], window_size=[7, 7]
    ).eval()
    import re

    def tv_name(key):
        key = key.removeprefix("body.")
        key = re.sub(r"^patch_embed\.proj\.", "features.0.0.", key)
        key = re.sub(r"^patch_embed\.norm\.", "features.0.2.", key)
        key = re.sub(r"^layers\.(\d)\.blocks\.", lambda m: f"features.{2 * int(m[1]) + 1}.", key)
        key = re.sub(r"^layers\.(\d)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 2}.", key)
        return key.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")

    mapped = {
        tv_name(k): v.flatten() if k.endswith("relative_position_index") else v
        for k, v in ours.state_dict().items()
        if not re.match(r"body\.norm\d", k)
    }
    for key, value in ref.state_dict().items():
        if key.endswith("relative_position_index"):  # computed, not learned: must agree as built
            assert torch.equal(value, mapped[key])
    missing, unexpected = ref.load_state_dict(mapped, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"] and unexpected == []

    x = torch.randn(1, 3, 256, 288)  # stage 3: 8 x 9 -> padded to 14 x 14 > window 7
    stages = []
    hooks = [ref.features[i].register_forward_hook(lambda m, a, out: stages.append(out)) for i in (1, 3, 5, 7)]
    with torch.no_grad():
        ref.features(x)
        c1, outs = ours(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(c1, stages[0].permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
    for i, out in zip((1, 2, 3), outs):
        norm = getattr(ours.body, f"norm{i}")
        torch.testing.assert_close(out, norm(stages[i]).permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
