"""Resuming and interrupting `mfcache train`: --resume needs nothing retyped, Ctrl-C and
SIGTERM save a checkpoint at the step reached, and resuming from it equals a run that was
never stopped, array by array."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mfcache.stopping import Interrupted, StopSignals, ignore_stop_signals, worker_batches
from tests.helpers.cli import invoke
from tests.helpers.processes import group_gone

# a head with random ops (point sampling), so an off-by-one in the RNG after resuming shows
SETTINGS = [
    "head.loss=point",
    "head.points=64",
    "train.steps=8",
    "train.batch_size=2",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.device=cpu",
    "train.min_iou=0.1",
]


def sets(*items):
    return [w for s in items for w in ("--set", s)]


@pytest.fixture(scope="module")
def cache(train_cache):
    """The small demo-detector cache the resume tests train on."""
    return train_cache


def log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_resume_takes_the_configuration_from_the_checkpoint(cache, tmp_path):
    run = tmp_path / "run"
    first = invoke(
        "train",
        "--cache",
        cache,
        "--out",
        run,
        "--head",
        "blendmask",
        *sets("train.steps=2", "train.batch_size=2", "train.num_workers=0", "train.device=cpu"),
        "-q",
    )
    assert first.exit_code == 0, first.output

    done = invoke("train", "--cache", cache, "--out", run, "--resume", "-q")  # nothing retyped
    assert done.exit_code == 0, done.output
    assert "already trained to step 2" in " ".join(done.output.split())

    longer = invoke("train", "--cache", cache, "--out", run, "--resume", "--set", "train.steps=4", "-q")
    assert longer.exit_code == 0, longer.output
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["config"]["head"]["name"] == "blendmask"
    assert state["config"]["train"]["steps"] == 4 and state["config"]["train"]["batch_size"] == 2
    assert [e["step"] for e in log(run)] == [2, 4]  # log_every 25: the last step of each part

    changed = invoke(
        "train", "--cache", cache, "--out", run, "--resume", "--set", "train.lr=0.1", "--set", "head.roi_size=16", "-q"
    )
    assert changed.exit_code == 1 and "Traceback" not in changed.output
    text = " ".join(changed.output.split())
    assert text.startswith("error:") and "train.lr" in text and "head.roi_size" in text
    shorter = invoke("train", "--cache", cache, "--out", run, "--resume", "--set", "train.steps=3", "-q")
    assert shorter.exit_code == 1 and "already at step 4" in " ".join(shorter.output.split())


# The real command, each step slowed down so the test can signal it mid-run.
CHILD = """
import sys, time
from mfcache.stages import train as training
lr_at = training.lr_at
training.lr_at = lambda *a: (time.sleep(0.25), lr_at(*a))[1]
from mfcache.cli.main import main
sys.argv = ["mfcache", *sys.argv[1:]]
main()
"""


def child(*args, workers=0):
    # a session of its own: the signal goes to the whole process group, as a terminal's Ctrl-C
    # does, so DataLoader workers get it too; the reference run uses the same thread count
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "COLUMNS": "300"},
    )


def train_args(cache, run, workers):
    return ["train", "--cache", cache, "--out", run, *sets(*SETTINGS, f"train.num_workers={workers}"), "-q"]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = child(*train_args(cache, run, 0))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return run


# Each signal goes to the whole process group (a terminal's Ctrl-C, scancel, a pod eviction),
# loader workers included: they are expected to go, quietly, with the main process.
@pytest.mark.parametrize(
    "signum, code, workers",
    [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 0), (signal.SIGTERM, 143, 2)],
    ids=["SIGINT", "SIGTERM", "SIGTERM-2-workers"],
)
def test_a_signal_saves_the_step_reached_and_resume_is_exact(cache, reference, tmp_path, signum, code, workers):
    run = tmp_path / "run"
    proc = child(*train_args(cache, run, workers))
    deadline = time.monotonic() + 240
    while not ((run / "log.jsonl").exists() and len((run / "log.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "training never reached step 2"
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    text = " ".join(err.split())
    assert "Traceback" not in err and "DataLoader worker" not in err and text.startswith("interrupted:"), err
    assert len(err.strip().splitlines()) == 1 and text.startswith(f"interrupted: {signal.Signals(signum).name} "), err
    assert group_gone(proc.pid), "a loader worker outlived the command"
    assert f"resume with: mfcache train --cache {cache} --out {run} --resume" in text, err

    state = torch.load(run / "checkpoint.pt", weights_only=False)
    stopped = state["step"]
    assert 2 <= stopped < 8 and f"at step {stopped} of 8" in text
    assert [e["step"] for e in log(run)] == list(range(1, stopped + 1))  # nothing logged past the checkpoint

    resumed = child("train", "--cache", cache, "--out", run, "--resume", "-q")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert log(run) == log(reference)
    a = torch.load(reference / "checkpoint.pt", weights_only=False)
    b = torch.load(run / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8 and torch.equal(a["rng"], b["rng"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sigusr1_is_an_early_warning_and_a_second_sigterm_stops_at_once():
    """SIGUSR1 (SLURM's --signal=USR1@N) asks for a stop like SIGTERM; the SIGTERM of the time
    limit after it is still a first stop (the save in progress goes on), a second one is not."""
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1 and stop.requested(torch.device("cpu"), world_enabled=False)
        os.kill(os.getpid(), signal.SIGTERM)  # after the warning: recorded, no exception
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGTERM)
        assert second.value.exit_code == 143 and "again" in str(second.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_loader_workers_ignore_stop_signals_and_end_with_the_loop():
    """A group-wide SIGTERM reaches the workers too: they ignore it, and leaving the loop ends
    them (they cannot outlive the command: multiprocessing's exit-time SIGTERM would not)."""
    loader = torch.utils.data.DataLoader(
        list(range(64)), batch_size=1, num_workers=2, worker_init_fn=ignore_stop_signals
    )
    with StopSignals() as stop, worker_batches(loader) as batches:
        next(batches)
        workers = list(batches._workers)
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
        assert [int(b) for _, b in zip(range(3), batches)] == [1, 2, 3]  # the workers lived on
    assert stop.signum is None and not any(w.is_alive() for w in workers)


TORCHRUN_SCRIPT = """
import sys, time
from pathlib import Path
from mfcache.stages import train as training
from mfcache.config import resolve_run_config
from mfcache.stopping import Interrupted
import os
if os.environ.get("SLOW_STEPS"):
    lr_at = training.lr_at
    training.lr_at = lambda *a: (time.sleep(1.0), lr_at(*a))[1]
resume = sys.argv[3] == "resume"
try:
    training.train(cache_path=Path(sys.argv[1]), run_dir=Path(sys.argv[2]), resume=resume,
                 config=None if resume else resolve_run_config(None, sys.argv[4:]), progress=False)
except Interrupted as exc:
    print(f"stopped: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def test_sigterm_under_torchrun_stops_every_rank_at_one_step(cache, tmp_path):
    """torchrun forwards SIGTERM to each rank; they agree on the step, rank 0 saves it, and the
    resumed two-rank run ends with the weights and log of an uninterrupted two-rank run."""
    settings = [
        "train.steps=6",
        "train.batch_size=4",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "train.num_workers=0",
        "train.device=cpu",
        "train.min_iou=0.1",
        "train.grad_clip=0",
    ]
    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT)

    def torchrun(run, *args, slow=False):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(cache),
            str(run),
            *args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_STEPS": "1" if slow else ""}
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = torchrun(tmp_path / "reference", "new", *settings)
    run = tmp_path / "two"
    proc = torchrun(run, "new", *settings, slow=True)
    deadline = time.monotonic() + 240
    while not ((run / "log.jsonl").exists() and len((run / "log.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "training never reached step 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-4000:]
    # checkpoint_every is 100: a checkpoint exists only because the ranks stopped and saved
    stopped = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert reference.wait(timeout=240) == 0, reference.communicate()[1][-4000:]
    assert 2 <= stopped < 6 and [e["step"] for e in log(run)] == list(range(1, stopped + 1))

    resumed = torchrun(run, "resume")
    assert resumed.wait(timeout=240) == 0, resumed.communicate()[1][-4000:]
    a = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=False)
    b = torch.load(run / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert log(run) == log(tmp_path / "reference")


def test_eval_of_an_unfinished_run_says_so_and_records_its_step(cache, tmp_path, monkeypatch):
    """A run stopped early (here by SIGUSR1, a scheduler's early warning, during its 2nd step)
    or still training: eval scores its head with a one-line warning naming the step, and
    metrics.json records it; once finished, finished: true and no warning."""
    from mfcache.stages import train as training

    run, lr_at, calls = tmp_path / "run", training.lr_at, []

    def warned_in_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return lr_at(*args)

    monkeypatch.setattr(training, "lr_at", warned_in_step_2)
    stopped = invoke(
        "train",
        "--cache",
        cache,
        "--out",
        run,
        *sets("train.steps=6", "train.batch_size=2", "train.num_workers=0", "train.device=cpu", "train.min_iou=0.1"),
        "-q",
    )
    assert stopped.exit_code == 138, stopped.output  # 128 + SIGUSR1
    assert " ".join(stopped.output.split()).startswith("interrupted: SIGUSR1 at step 2 of 6;")

    evaluated = invoke("eval", "--cache", cache, "--run", run, "--split", "train", "--device", "cpu", "-q")
    assert evaluated.exit_code == 0, evaluated.output
    warnings = [line for line in evaluated.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"the run in {run} is not finished: trained to step 2 of 6" in warnings[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["step"], metrics["steps"], metrics["finished"]) == (2, 6, False)

    monkeypatch.setattr(training, "lr_at", lr_at)
    assert invoke("train", "--cache", cache, "--out", run, "--resume", "-q").exit_code == 0
    evaluated = invoke("eval", "--cache", cache, "--run", run, "--split", "train", "--device", "cpu", "-q")
    assert evaluated.exit_code == 0 and "warning" not in evaluated.stderr, evaluated.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["step"], metrics["steps"], metrics["finished"]) == (6, 6, True)
