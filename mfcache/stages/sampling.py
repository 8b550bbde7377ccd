"""Which images each training step sees, and its learning rate: pure functions of the step.

Shared by the head trainer (:mod:`mfcache.stages.train`) and the demo detector's trainers
(:mod:`mfcache.demo_detector`), so a resumed run sees exactly the batches (and rates) an
uninterrupted one would.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from mfcache.data.views import epoch_views
from mfcache.distributed import World
from mfcache.errors import MfcacheError


def lr_at(step: int, total: int, base: float, drops: tuple[float, ...]) -> float:
    """Step schedule: ``base`` x 0.1 for every fraction in ``drops`` already passed."""
    return base * 0.1 ** sum(step >= int(f * total) for f in drops)


class StepBatches(Sampler):
    """Batch ``s`` of a run is a pure function of (seed, s): a fresh permutation per epoch.
    Resuming at step s therefore sees exactly the batches an uninterrupted run would."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.bs, self.seed, self.start, self.stop = num_items, min(batch_size, num_items), seed, start, stop

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The generator epoch ``epoch``'s permutation is drawn from (its first draw); a
        subclass may draw more per-epoch randomness from it after the permutation."""
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch)

    def batch(self, step: int) -> list[int]:
        per_epoch = self.n // self.bs
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(self.n, generator=self.epoch_generator(epoch))
        return perm[pos * self.bs : (pos + 1) * self.bs].tolist()

    def __iter__(self):
        return (self.batch(s) for s in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class ViewStepBatches(StepBatches):
    """:class:`StepBatches` (the same images, step for step) on a cache of ``views`` views
    per image (``extract --views``): batch ``s`` is a list of ``(image, view)`` keys, each
    image drawn at one view per epoch, a pure function of ``(seed, epoch, image)``
    (:func:`mfcache.data.views.epoch_views`), so a resumed run sees the same views."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int, *, views: int):
        super().__init__(num_items, batch_size, seed, start, stop)
        self.views = views

    def batch(self, step: int) -> list[tuple[int, int]]:
        chosen = super().batch(step)
        views = epoch_views(self.seed, step // (self.n // self.bs), self.n, self.views)
        return [(i, int(views[i])) for i in chosen]


def step_batches(num_items: int, batch_size: int, seed: int, start: int, stop: int, *, views: int = 1) -> StepBatches:
    """The training sampler: plain :class:`StepBatches` on a one-view cache (the batches runs
    always had), :class:`ViewStepBatches` on a cache of several views."""
    if views == 1:
        return StepBatches(num_items, batch_size, seed, start, stop)
    return ViewStepBatches(num_items, batch_size, seed, start, stop, views=views)


class RankSlice(Sampler):
    """This rank's share of each global batch of ``batches``: items ``rank::size``, so the
    ranks together see exactly the batches of a one-process run."""

    def __init__(self, batches: StepBatches, world: World):
        if batches.bs < world.size:
            raise MfcacheError(f"train.batch_size={batches.bs} is smaller than the {world.size} torchrun processes")
        self.batches, self.world = batches, world

    def __iter__(self):
        return (b[self.world.rank :: self.world.size] for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)
