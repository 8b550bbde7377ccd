"""Running ``mfcache`` commands from a test, three ways, and the one assertion every user-error
test makes about a result.

- :func:`invoke`: in-process (typer's ``CliRunner``), the result (``code=N`` asserts the exit code);
- :func:`run_ok`: the same, asserting it exited 0;
- :func:`run_mfcache`: a new interpreter, as a user's shell runs it, both streams piped.
"""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import Result
from typer.testing import CliRunner

from mfcache.cli.main import app

_runner = CliRunner()


def invoke(*args, code: int | None = None, **kwargs) -> Result:
    """``mfcache ARGS`` in-process; each argument ``str()``-ed (paths, numbers), ``kwargs`` go to
    ``CliRunner.invoke`` (``input=``, ``env=``). ``result.output`` holds stdout and stderr,
    ``result.stdout`` / ``result.stderr`` each alone. With ``code``, asserts the exit code (the
    command's output is the failure message)."""
    result = _runner.invoke(app, [str(a) for a in args], **kwargs)
    if code is not None:
        assert result.exit_code == code, result.output
    return result


def run_ok(*args, **kwargs) -> Result:
    """:func:`invoke` asserting exit code 0."""
    return invoke(*args, code=0, **kwargs)


def run_mfcache(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``mfcache ARGS`` in a new Python process with both streams piped (text), the environment
    ``os.environ`` updated with ``env``; ``kwargs`` go to ``subprocess.run`` (``cwd=``,
    ``preexec_fn=``, ``timeout=``, 300 s unless given)."""
    kwargs.setdefault("timeout", 300)
    command = [sys.executable, "-m", "mfcache", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs)


def one_error_line(result, *needles):
    """``result`` (typer's CliRunner) exited 1 with one ``error:`` message and no traceback;
    the message (rich may wrap it) contains every ``needle``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and text.count("error:") == 1, result.output
    for needle in needles:
        assert needle in text, text


def extract_demo(data, out, *extra, annotations=None) -> Result:
    """``mfcache extract`` (:func:`invoke`) of the shapes layout ``data``'s train images (``annotations``,
    ``data/annotations/train.json`` unless given) with the demo detector into ``out``, small and quiet:
    top 10 queries, 8 px targets, blocks of 2, no workers, CPU; ``extra`` options appended."""
    annotations = annotations or data / "annotations" / "train.json"
    return invoke(
        "extract",
        "--detector",
        "demo",
        "--images",
        data / "train",
        "--annotations",
        annotations,
        "--out",
        out,
        "--workers",
        0,
        "--topk",
        10,
        "--target-size",
        8,
        "--block-size",
        2,
        "--device",
        "cpu",
        "-q",
        *extra,
    )


def command_paths(group=None, prefix=()):
    """Every leaf command of the app, e.g. ("data", "shapes"), read from the app itself."""
    import typer.main

    group = group or typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from command_paths(command, (*prefix, name))
        else:
            yield (*prefix, name)


COMMANDS = list(command_paths())
