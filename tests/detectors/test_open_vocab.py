"""Open-vocabulary detectors, whose classes are the phrases of a text prompt: Grounding DINO,
MM Grounding DINO and OmDet-Turbo. A tiny random model per family (tiny Swin backbone, tiny
BERT / CLIP text model) is saved with its processor, whose tokenizer is built here from a
written vocabulary (nothing is downloaded), and loaded through ``hf:<dir>``. The adapter is
checked against the model's own outputs and post-processing; then extract (the prompt from
the category names or ``--prompts``, recorded in the fingerprint) -> train -> eval -> predict."""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mfcache.config import ExtractConfig, resolve_run_config
from mfcache.data.prompts import prompt_phrases, read_prompts, with_implied_map
from mfcache.data.shapes import CATEGORIES
from mfcache.detectors import load_detector
from mfcache.detectors.base import level_shapes, select_topk
from mfcache.errors import MfcacheError
from tests.helpers.batches import padded_batch
from tests.helpers.cli import invoke, one_error_line, run_ok

transformers = pytest.importorskip("transformers")
T = transformers
WORDS = (*CATEGORIES, "circle", "moon", "detect")
SIZES = [(64, 91), (48, 64)]  # unpadded inputs (Grounding DINO: shortest edge 64, longest 100)
FIXED = (64, 64)  # OmDet-Turbo's input size
EXTRACT = ExtractConfig(topk=12, target_size=8, block_size=2, num_workers=0, device="cpu")


# ----------------------------------------------------------------------------- tiny models
def _bert_tokenizer(folder):
    """A WordPiece vocabulary with BERT's ids for [CLS] 101, [SEP] 102, '.' 1012 and '?' 1029
    (Grounding DINO's phrase separators are those ids)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 1012 - len(vocab))] + ["."]
    vocab += [f"[unused{i}]" for i in range(2000, 2016)] + ["?", ",", "##s", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return T.BertTokenizer(vocab=str(folder / "vocab.txt"))


def _clip_tokenizer(folder):
    """A byte-level BPE vocabulary of letters, digits and a few marks, with merges for WORDS."""
    chars = list(string.ascii_lowercase + string.digits + ",.-'")
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab += [parts[0]] if parts[0] not in vocab else []
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return T.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def _swin():
    return T.SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )


def _grounding(config_cls, model_cls):
    def build(folder):
        tokenizer = _bert_tokenizer(folder)
        text = T.BertConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
        # two decoder layers: the per-layer heads are tied to layer 0; d_model 64: its GroupNorm(32)
        # needs two channels per group on a 1 x 1 level (a 64 x 64 input)
        config = config_cls(
            backbone_config=_swin(),
            text_config=text,
            d_model=64,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=10,
            max_text_len=32,
        )
        image = T.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 100})
        return model_cls(config), T.GroundingDinoProcessor(image_processor=image, tokenizer=tokenizer)

    return build


def _omdet(folder):
    tokenizer = _clip_tokenizer(folder)
    vocab = tokenizer.get_vocab()
    text = T.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    # a transformers Swin (no timm), whose maps need no extra layer norm; the class embedding
    # width differs from the decoder's, as transformers' decoder needs (its task_project)
    config = T.OmDetTurboConfig(
        backbone_config=_swin(),
        text_config=text,
        use_timm_backbone=False,
        apply_layernorm_after_vision_backbone=False,
        encoder_in_channels=[32, 64, 128],
        encoder_hidden_dim=32,
        vision_features_channels=[32, 32, 32],
        encoder_dim_feedforward=64,
        encoder_attention_heads=2,
        text_projection_in_dim=48,
        text_projection_out_dim=48,
        class_embed_dim=48,
        task_encoder_hidden_dim=64,
        decoder_hidden_dim=32,
        decoder_num_heads=2,
        decoder_dim_feedforward=64,
        decoder_num_layers=2,
        num_queries=10,
        image_size=FIXED[0],
    )
    image = T.DetrImageProcessor(size={"height": FIXED[0], "width": FIXED[1]}, do_pad=False)
    return T.OmDetTurboForObjectDetection(config), T.OmDetTurboProcessor(image_processor=image, tokenizer=tokenizer)


@dataclass
class Family:
    build: Callable  # folder -> (model, processor); the tokenizer's files are written into the folder
    strides: tuple[int, ...]
    d_model: int
    fixed: bool


FAMILIES = {
    "grounding-dino": Family(
        _grounding(T.GroundingDinoConfig, T.GroundingDinoForObjectDetection), (8, 16, 32, 64), 64, False
    ),
    "mm-grounding-dino": Family(
        _grounding(T.MMGroundingDinoConfig, T.MMGroundingDinoForObjectDetection), (8, 16, 32, 64), 64, False
    ),
    "omdet-turbo": Family(_omdet, (8, 16, 32), 32, True),
}


def _save(name: str, tmp_path_factory):
    family = FAMILIES[name]
    path = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model, processor = family.build(path)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)  # with the tokenizer: hf:<dir> loads both
    return name, family, path, model, processor


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    return _save(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def grounding_saved(tmp_path_factory):
    """One family only: the prompt -> category mapping is the same for every family."""
    return _save("grounding-dino", tmp_path_factory)


def _extract(path, shapes, out, split="val", **options):
    from mfcache.stages.extract import extract

    config = ExtractConfig(**{**EXTRACT.__dict__, **options})
    return extract(
        detector=f"hf:{path}",
        images=shapes / split,
        annotations=shapes / "annotations" / f"{split}.json",
        out=out,
        config=config,
        progress=False,
    )


# ----------------------------------------------------------------------------- the adapters
def _text_inputs(processor, batch):
    """The processor's own text tensors for the category names, one copy per image."""
    images = [np.zeros((FIXED[0], FIXED[1], 3), dtype=np.uint8)] * batch
    inputs = processor(images=images, text=[list(CATEGORIES)] * batch, return_tensors="pt")
    return {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_mask")}


def _phrase_blocks(ids: list[int]) -> list[list[int]]:
    """Token positions of each phrase: the runs between [CLS] (101), '.' (1012) and [SEP] (102)."""
    blocks, current = [], []
    for i, token in enumerate(ids):
        if token in (101, 102, 1012):
            blocks += [current] if current else []
            current = []
        else:
            current.append(i)
    return blocks


def _check_grounding(det, model, processor, out, pv, pm):
    text = _text_inputs(processor, len(pv))
    assert det._input_ids[0].tolist() == text["input_ids"][0].tolist()  # the processor's prompt
    with torch.no_grad():
        raw = model(pixel_values=pv, pixel_mask=pm.long(), **text)
    blocks = _phrase_blocks(text["input_ids"][0].tolist())
    assert len(blocks) == len(CATEGORIES)
    expected = torch.stack([raw.logits[..., b].amax(-1) for b in blocks], dim=-1)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.queries, raw.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.memory, raw.encoder_last_hidden_state_vision, rtol=0, atol=1e-5)
    # the model's own post-processing, on the phrases' tokens: one detection per query, its score
    # the max over tokens, its label the text of the tokens at that score
    masked = raw.logits.clone()
    keep = torch.zeros(masked.shape[-1], dtype=torch.bool)
    keep[[i for b in blocks for i in b]] = True
    masked[..., ~keep] = float("-inf")
    raw.logits = masked
    q = model.config.num_queries
    top = select_topk(out, q, sigmoid=True, agnostic=True)
    ref = processor.post_process_grounded_object_detection(
        raw, threshold=-1.0, text_threshold=0.0, target_sizes=[tuple(s) for s in SIZES]
    )
    for i, r in enumerate(ref):  # the processor keeps query order
        torch.testing.assert_close(top.scores[i], r["scores"][top.query_index[i]], rtol=0, atol=1e-5)
        torch.testing.assert_close(top.boxes[i], r["boxes"][top.query_index[i]], rtol=0, atol=1e-4)
        for j in range(3):  # the best detections' labels: the tokens scoring that
            score = float(top.scores[i, j])
            label = processor.post_process_grounded_object_detection(raw, threshold=-1.0, text_threshold=score - 1e-6)[
                i
            ]["text_labels"][int(top.query_index[i, j])]
            assert CATEGORIES[int(top.labels[i, j])] in label.split()  # ties: several tokens


def _check_omdet(det, model, processor, out, pv, pm):
    text = _text_inputs(processor, len(pv))
    with torch.no_grad():
        raw = model(pixel_values=pv, output_hidden_states=True, **text)
        maps = [proj(m) for proj, m in zip(model.decoder.channel_projection_layers, raw.encoder_extracted_states)]
    torch.testing.assert_close(out.logits, raw.decoder_class_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.queries, raw.decoder_hidden_states[-1], rtol=0, atol=1e-5)
    memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
    torch.testing.assert_close(out.memory, memory, rtol=0, atol=1e-5)
    k = 12  # (query, phrase) pairs, as its post-processing ranks them before NMS (1.0 keeps every box)
    top = select_topk(out, k, sigmoid=True)
    ref = processor.post_process_grounded_object_detection(
        raw,
        text_labels=[list(CATEGORIES)] * len(pv),
        threshold=-1.0,
        nms_threshold=1.0,
        target_sizes=[FIXED] * len(pv),
        max_num_det=k,
    )
    for i, r in enumerate(ref):
        torch.testing.assert_close(top.scores[i], r["scores"], rtol=0, atol=1e-5)
        assert top.labels[i].tolist() == r["labels"].tolist()
        torch.testing.assert_close(top.boxes[i], r["boxes"], rtol=0, atol=1e-4)


def test_adapter_matches_the_model(saved):
    name, family, path, model, processor = saved
    det = load_detector(f"hf:{path}", prompts=CATEGORIES)
    info = det.info
    assert (info.family, info.prompts, info.label_names) == (name, CATEGORIES, CATEGORIES)
    assert (info.strides, info.c1_channels, info.d_model, info.num_queries, info.sigmoid) == (
        family.strides,
        16,
        family.d_model,
        10,
        True,
    )
    if family.fixed:
        assert info.preprocess.fixed_size == FIXED
    else:  # read from the whole processor's processor_config.json
        p = info.preprocess
        assert (p.shortest_edge, p.longest_edge, p.fixed_size) == (64, 100, None)
    sizes = [FIXED, FIXED] if family.fixed else SIZES
    pv, pm = padded_batch(sizes, info.preprocess.pad_divisor, fill=torch.rand)
    out = det(pv, pm)
    (_check_omdet if family.fixed else _check_grounding)(det, model, processor, out, pv, pm)

    height, width = pv.shape[-2:]
    assert out.spatial_shapes.tolist() == [[-(-height // s), -(-width // s)] for s in info.strides]
    assert int(out.spatial_shapes.prod(1).sum()) == out.memory.shape[1]
    for i, hw in enumerate(sizes):
        assert out.valid[i].tolist() == [list(x) for x in level_shapes(hw, info.strides)]
    with torch.no_grad():  # C1: Swin's stage-1 map (stride 4, before its patch merging)
        hidden = det._backbone()(pv, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.c1, hidden[1], rtol=0, atol=1e-5)
    assert out.c1.shape == (2, 16, height // 4, width // 4)
    alone = det(pv[:1], pm[:1])  # the same text with every image: batch mates change nothing
    torch.testing.assert_close(alone.logits, out.logits[:1], rtol=0, atol=1e-4)


def test_a_detector_without_its_prompt_refuses_to_run(saved):
    name, family, path, *_ = saved
    det = load_detector(f"hf:{path}")
    assert det.open_vocabulary and det.info.label_names == () == det.info.prompts
    pv, pm = padded_batch([FIXED], det.info.preprocess.pad_divisor)
    with pytest.raises(MfcacheError, match="needs its text prompt"):
        det(pv, pm)
    with pytest.raises(MfcacheError, match="are the same to the model"):
        det.set_prompts(["ring", "Ring"])


def test_prompts_beyond_the_model_are_refused(saved):
    name, family, path, *_ = saved
    det = load_detector(f"hf:{path}")
    if family.fixed:
        with pytest.raises(MfcacheError, match="is 8[0-9] tokens; the model reads at most 77"):
            det.set_prompts(["ring", " ".join(["star"] * 80)])
        return
    with pytest.raises(MfcacheError, match=r"is 62 tokens \(20 phrases\); the model reads at most 32"):
        det.set_prompts([f"{w} {v}" for w in WORDS[:5] for v in WORDS[5:9]])
    with pytest.raises(MfcacheError, match="'ring.star' holds a token the model reads as a phrase separator"):
        det.set_prompts(["ring.star", "cross"])


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def extracted(saved, shapes, tmp_path_factory):
    """Both splits cached with the default prompt (the category names)."""
    name, family, path, *_ = saved
    out = tmp_path_factory.mktemp(f"cache-{name}") / "cache"
    for split in ("train", "val"):
        summary = _extract(path, shapes, out, split)
        assert summary.written == summary.num_rows
    return out


def test_extract_train_evaluate_predict_with_the_recorded_prompt(saved, shapes, extracted, tmp_path):
    from mfcache.cache.reader import Cache
    from mfcache.stages.evaluate import evaluate
    from mfcache.stages.predict import load_segmenter, predict_images
    from mfcache.stages.train import train

    name, family, path, *_ = saved
    cache = Cache(extracted)
    assert cache.detector.family == name and cache.detector.prompts == CATEGORIES == cache.detector.label_names
    assert cache.fingerprint["detector"]["prompts"] == list(CATEGORIES)
    assert cache.split("val").label_to_category.tolist() == [1, 2, 3, 4, 5, 6]  # the phrases name the categories
    shown = " ".join(run_ok("inspect", extracted).output.split())
    assert 'prompt 6 phrases: "ring", "star", "crescent", "ell", "cross", "triangle"' in shown
    assert json.loads(run_ok("inspect", extracted, "--json").output)["detector"]["prompts"] == list(CATEGORIES)

    run = resolve_run_config(None, ["train.steps=1", "train.batch_size=2", "train.device=cpu", "train.min_iou=0"])
    train(cache_path=extracted, run_dir=tmp_path / "run", config=run, split="train", progress=False)
    metrics = evaluate(cache_path=extracted, run_dir=tmp_path / "run", split="val", progress=False, device="cpu")
    assert metrics["num_images"] == 2 and metrics["num_detections"] > 0
    assert load_segmenter(tmp_path / "run", device="cpu").model.info.prompts == CATEGORIES  # the cache's
    summary = predict_images(
        run_dir=tmp_path / "run",
        inputs=[shapes / "val"],
        out=tmp_path / "pred",
        device="cpu",
        progress=False,
        overlays=False,
        score_threshold=0.0,
    )
    results = json.loads(summary.results.read_text())
    assert summary.num_images == 2 and results
    assert {r["category_id"] for r in results} <= set(range(1, 7))


def test_a_changed_prompt_is_another_cache(saved, shapes, extracted, tmp_path):
    name, family, path, *_ = saved
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"crescent": "moon"}))
    result = invoke(
        "extract",
        "--detector",
        f"hf:{path}",
        "--images",
        shapes / "val",
        "--annotations",
        shapes / "annotations" / "val.json",
        "--out",
        extracted,
        "--topk",
        EXTRACT.topk,
        "--target-size",
        EXTRACT.target_size,
        "--workers",
        0,
        "--device",
        "cpu",
        "--prompts",
        prompts,
        "-q",
    )
    one_error_line(
        result,
        f"cache {extracted} was made with another prompt",
        "phrase 3 is 'crescent' in the cache, 'moon' asked for",
        "another prompt is another cache",
    )


def test_prompt_files_map_phrases_to_categories(grounding_saved, shapes, tmp_path):
    from mfcache.cache.reader import Cache

    name, family, path, *_ = grounding_saved
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps({"ring": "circle", "crescent": None}))  # crescent left out of the prompt
    _extract(path, shapes, tmp_path / "object", prompts=str(renamed))
    cache = Cache(tmp_path / "object")
    assert cache.detector.prompts == ("circle", "star", "ell", "cross", "triangle")
    assert cache.split("val").label_to_category.tolist() == [1, 2, 4, 5, 6]
    assert cache.settings.label_map == {"circle": 1}  # the implied map, in the fingerprint
    assert cache.split("val").attrs["unmapped_categories"].keys() == {"3"}

    listed, label_map = tmp_path / "listed.json", tmp_path / "map.json"
    listed.write_text(json.dumps(["circle", "moon", "star"]))
    label_map.write_text(json.dumps({"circle": "ring", "moon": 3}))
    _extract(path, shapes, tmp_path / "list", prompts=str(listed), label_map=str(label_map))
    assert Cache(tmp_path / "list").split("val").label_to_category.tolist() == [1, 3, 2]
    _extract(path, shapes, tmp_path / "agnostic", prompts=str(listed), class_agnostic=True)
    cache = Cache(tmp_path / "agnostic")
    assert cache.detector.prompts == ("circle", "moon", "star") and cache.split("val").attrs["class_agnostic"]


def test_prompt_file_forms():
    categories = {1: "ring", 2: "star", 5: "dining table"}
    assert prompt_phrases(None, categories) == (("ring", "star", "dining table"), {})
    assert prompt_phrases(["a ring ", "star"], categories) == (("a ring", "star"), {})
    assert prompt_phrases({"dining table": "table", "star": None}, categories) == (("ring", "table"), {"table": 5})
    assert with_implied_map({"table": 1}, {"table": 5, "ring": 1}) == {"table": 1, "ring": 1}  # --label-map wins
    assert with_implied_map("agnostic", {"table": 5}) == "agnostic"
    with pytest.raises(MfcacheError, match="'table' is not a dataset category; the categories are ring, star"):
        prompt_phrases({"table": "desk"}, categories)
    with pytest.raises(MfcacheError, match="phrase 2 is blank"):
        prompt_phrases(["ring", " "], categories)
    with pytest.raises(MfcacheError, match="phrases 'STAR' and 'star' are the same"):
        prompt_phrases({"ring": "STAR"}, categories)


@pytest.mark.parametrize(
    "text, needle",
    [
        ('["ring",]', "not valid JSON"),
        ("[]", "expected a non-empty JSON list"),
        ('{"ring": 3}', "or null}"),
        ('"ring"', "expected a non-empty JSON list"),
    ],
)
def test_a_bad_prompt_file_is_one_clear_error(tmp_path, text, needle):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(MfcacheError, match=f"`extract.prompts` {tmp_path / 'p.json'}: .*") as caught:
        read_prompts(tmp_path / "p.json")
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_detector_with_fixed_classes_refuses_prompts(shapes, tmp_path):
    (tmp_path / "p.json").write_text('["ring"]')
    result = invoke(
        "extract",
        "--detector",
        "demo",
        "--images",
        shapes / "val",
        "--annotations",
        shapes / "annotations" / "val.json",
        "--out",
        tmp_path / "cache",
        "--workers",
        0,
        "--prompts",
        tmp_path / "p.json",
        "-q",
    )
    one_error_line(result, "demo (deformable_detr) has fixed classes; --prompts applies to open-vocabulary detectors")
    assert not (tmp_path / "cache" / "zarr.json").exists()


def test_caches_from_before_prompts_still_match():
    from mfcache.cache.schema import fingerprint, fingerprint_mismatch
    from mfcache.detectors.base import DetectorInfo

    info = DetectorInfo(
        spec="t",
        family="f",
        d_model=8,
        num_queries=4,
        label_names=("a",),
        strides=(8,),
        c1_channels=0,
        sigmoid=True,
        weights_sha256="0",
    )
    new = fingerprint(info, topk=4, target_size=8, c1="none", dtype="float16")
    old = json.loads(json.dumps(new))
    del old["detector"]["prompts"]
    assert fingerprint_mismatch(old, new) is None
    assert DetectorInfo.from_dict(old["detector"]) == info
