"""Training batches and the learning-rate schedule: pure functions of the step."""

from mfcache.stages.sampling import StepBatches, lr_at


def test_lr_schedule_drops_at_90_and_95_percent():
    lrs = [lr_at(s, 100, 1.0, (0.9, 0.95)) for s in (0, 89, 90, 94, 95, 99)]
    assert lrs == [1.0, 1.0, 0.1, 0.1, 0.1**2, 0.1**2]


def test_step_batches_are_a_function_of_the_step():
    full = list(StepBatches(10, 4, seed=1, start=0, stop=9))
    resumed = list(StepBatches(10, 4, seed=1, start=5, stop=9))
    assert full[5:] == resumed
    assert all(len(b) == 4 and len(set(b)) == 4 for b in full)
    epoch0 = full[0] + full[1]
    assert len(set(epoch0)) == 8
