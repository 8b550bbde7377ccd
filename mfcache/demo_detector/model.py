"""The demo detector in training and out of it: :func:`trainable_demo_model` makes
:func:`~mfcache.detectors.demo.build_demo_model` trainable, :func:`export_model` writes it
back as the ``from_pretrained`` folder that ships as ``mfcache/detectors/demo_weights/``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from mfcache.detectors.base import Preprocess
from mfcache.detectors.demo import GENERATOR_FILE, TRAINING_FILE, build_demo_model
from mfcache.outputs import write_errors


def trainable_demo_model(seed: int) -> nn.Module:
    """:func:`build_demo_model` set up for training: every parameter trainable (transformers
    freezes the built-in ResNet backbone: it unfreezes ``stage.N`` names, the ResNet calls
    them ``stages.N``), the backbone's frozen batch norms made trainable again (see
    :func:`unfreeze_batch_norm`) and one loss per decoder layer (``auxiliary_loss``; no
    new weights)."""
    model = build_demo_model(seed)
    model.config.auxiliary_loss = True
    unfreeze_batch_norm(model)
    model.requires_grad_(True)
    return model


def unfreeze_batch_norm(module: nn.Module) -> None:
    """Swap every frozen batch norm under ``module`` for a trainable ``nn.BatchNorm2d`` with
    the same affine and running statistics, in place. transformers freezes them for
    pretrained backbones; a backbone trained from scratch with frozen (identity) norms has
    no normalisation at all and learns far more slowly. :func:`frozen_copy` swaps back."""
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrFrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, DeformableDetrFrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.weight.numel())
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, key).copy_(getattr(child, key))
            module._modules[name] = norm.to(child.weight.device)
        else:
            unfreeze_batch_norm(child)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of the training model with its batch norms frozen again (statistics and
    affine kept): the architecture :func:`build_demo_model` makes and ``from_pretrained``
    loads, equal to ``model`` in eval mode."""
    from transformers.models.deformable_detr.modeling_deformable_detr import replace_batch_norm

    frozen = copy.deepcopy(model).eval()
    replace_batch_norm(frozen)
    return frozen


def preprocessor_config(preprocess: Preprocess) -> dict:
    """A transformers ``preprocessor_config.json`` for DETR-style resizing (what
    :func:`mfcache.detectors.hf.read_preprocess` reads back)."""
    config = {
        "image_processor_type": "DeformableDetrImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": preprocess.shortest_edge, "longest_edge": preprocess.longest_edge},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
        "do_pad": True,
    }
    if preprocess.pad_size is not None:
        config["pad_size"] = {"height": preprocess.pad_size[0], "width": preprocess.pad_size[1]}
    return config


def export_model(
    model: nn.Module, out: Path, generator: dict, preprocess: Preprocess, training: dict | None = None
) -> None:
    """``save_pretrained(out)`` + ``preprocessor_config.json`` + ``shapes_generator.json``
    (+ ``training.json``: how the weights were trained and their val bbox AP), replacing
    ``out`` whole: the files are written to ``out.tmp``, which then takes ``out``'s place
    (a folder, so :func:`~mfcache.outputs.atomic_write`'s one-file rename does not apply)."""
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    with write_errors("the exported demo detector", out):
        shutil.rmtree(tmp, ignore_errors=True)
        frozen_copy(model).save_pretrained(tmp)
        files = {"preprocessor_config.json": preprocessor_config(preprocess), GENERATOR_FILE: generator}
        if training is not None:
            files[TRAINING_FILE] = training
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
