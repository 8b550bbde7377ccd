"""The built-in demo detector (spec ``demo``): a small Deformable DETR for the synthetic
shapes data set (:mod:`mfcache.data.shapes`).

Trained weights, when shipped, live in ``demo_weights/`` next to this file
(``config.json`` + ``model.safetensors``, optionally ``preprocessor_config.json``);
without them :func:`load_demo` builds the same architecture from a fixed seed and marks
it ``trained=False`` so nothing mistakes its outputs for detections.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mfcache.detectors.base import Detector, Preprocess, state_dict_sha256

DEMO_WEIGHTS = Path(__file__).with_name("demo_weights")
# Written next to shipped weights by mfcache.demo_detector.train (mfcache.demo_detector.model.export_model):
# {"generator_version": ..., "seed": ..., "num_train": ...} of the shapes data trained on.
GENERATOR_FILE = "shapes_generator.json"
# {"step", "epoch", "images_seen", "hours", "device", "val_bbox": {"AP", ...}, "config", ...}
TRAINING_FILE = "training.json"

# The shapes images have width and height each drawn from [128, 256], and every shape is
# sized as a share (15-60%) of the image's short side. Resizing the short side to 128
# fixes object scale in input pixels (~19-77 px) whatever the image size; longest edge
# 192 caps the elongated ones (aspect up to 2). A 128x192 input gives 504 memory tokens
# and a 32x48 C1 map: small enough to train the detector on two CPU cores (~12 img/s)
# and to keep `mfcache demo` within minutes. Every batch is padded to the 192x192 canvas
# that (nearly) every training batch of 8 had: the trained detector's outputs depend on
# the canvas (bbox AP 0.500 on it, 0.438 for images padded one by one to a multiple of 64).
# The detector was trained (mfcache.demo_detector.train) on the float pixel path, so that
# path is its own preprocessing; its preprocessor_config.json cannot say so (transformers'
# processors resize in uint8), hence ``resize`` is set here, not read from the file.
DEMO_PREPROCESS = Preprocess(shortest_edge=128, longest_edge=192, pad_size=(192, 192), resize="float")
DEMO_SEED = 0
DEMO_QUERIES = 30


def demo_config():
    """The demo architecture: ResNet-ish 4-stage basic-block backbone (C3-C5 + one extra
    level, strides 8/16/32/64), d_model 128, 2+2 layers, two-stage with box refinement
    and 30 queries (an image holds at most 5 shapes and one crowd region). Two-stage
    queries start from the encoder's best proposals, which is what makes it trainable
    on a CPU budget."""
    from transformers import DeformableDetrConfig, ResNetConfig

    from mfcache.data.shapes import CATEGORIES

    backbone = ResNetConfig(
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 256],
        depths=[1, 1, 2, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    return DeformableDetrConfig(
        backbone_config=backbone,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        num_feature_levels=4,
        num_queries=DEMO_QUERIES,
        two_stage_num_proposals=DEMO_QUERIES,
        with_box_refine=True,
        two_stage=True,
        id2label={i: name for i, name in enumerate(CATEGORIES)},
        label2id={name: i for i, name in enumerate(CATEGORIES)},
    )


def build_demo_model(seed: int = DEMO_SEED):
    """The demo architecture, randomly initialised from ``seed`` (global RNG left untouched)."""
    from transformers import DeformableDetrForObjectDetection

    config = demo_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeformableDetrForObjectDetection(config)
    return model.eval()


def check_generator(weights: Path) -> dict:
    """``weights/shapes_generator.json``, which must name the current shapes
    ``GENERATOR_VERSION`` (weights trained on other shapes would silently mis-detect)."""
    import json

    from mfcache.data.shapes import GENERATOR_VERSION
    from mfcache.errors import MfcacheError

    path = weights / GENERATOR_FILE
    try:
        info = json.loads(path.read_text())
        version = info["generator_version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MfcacheError(
            f"{path}: cannot read the shapes generator version of the demo weights ({type(exc).__name__}: {exc})"
        ) from None
    if str(version) != GENERATOR_VERSION:
        raise MfcacheError(
            f"{path}: demo weights were trained on shapes generator version {version!r}, "
            f"but this mfcache generates version {GENERATOR_VERSION!r}; retrain them with "
            "python -m mfcache.demo_detector.train"
        )
    return info


def load_demo(weights: Path | None = None) -> Detector:
    """The ``demo`` detector: trained weights from ``weights`` (default: the shipped
    ``demo_weights/``) if present and made for the current shapes generator, else an
    untrained seed-0 model."""
    from mfcache.detectors.hf import HFDeformableDetr, load_hf, read_preprocess

    weights = DEMO_WEIGHTS if weights is None else Path(weights)
    if (weights / "config.json").is_file() and (weights / "model.safetensors").is_file():
        check_generator(weights)
        own = weights / "preprocessor_config.json"
        preprocess = read_preprocess(own, DEMO_PREPROCESS) if own.is_file() else DEMO_PREPROCESS
        return load_hf(str(weights), spec="demo", preprocess=preprocess)
    model = build_demo_model(DEMO_SEED)
    return HFDeformableDetr(
        model, spec="demo", preprocess=DEMO_PREPROCESS, weights_sha256=state_dict_sha256(model), trained=False
    )
