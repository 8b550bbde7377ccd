"""transformers detector families for tests: the shapes categories as a model's labels, a tiny
random model saved with its processor, and a padded batch of random inputs."""

import torch

from mfcache.data.shapes import CATEGORIES
from tests.helpers.batches import padded_batch

LABELS = dict(  # the shapes categories as a model config's labels
    num_labels=len(CATEGORIES),
    id2label=dict(enumerate(CATEGORIES)),
    label2id={name: i for i, name in enumerate(CATEGORIES)},
)


def family_batch(sizes, pad):
    """Random inputs of ``sizes`` padded as a processor would (``pad``), with their pixel mask."""
    return padded_batch(sizes, pad, fill=torch.rand)


def save_family(name: str, family, tmp_path_factory):
    """``family``'s tiny random model (seed 0) and its processor saved to a new folder ->
    (name, family, folder, the model)."""
    path = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = family.build().eval()
    model.save_pretrained(path)
    family.processor().save_pretrained(path)
    return name, family, path, model
