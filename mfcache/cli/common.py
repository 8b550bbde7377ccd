"""What every command shares: one-line user errors (the settings they name spelled as options: CLI_NAMES) and
option types."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mfcache.config import ExtractConfig
from mfcache.errors import MfcacheError
from mfcache.runtime import console


def print_json(document) -> None:
    """``document`` as one JSON document on stdout, alone (``--json``): paths as strings, no
    rich markup, highlighting or wrapping."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def user_errors(fn=None, *, interrupted: str | Callable[[dict], str] = ""):
    """Turn :class:`MfcacheError` into red ``error:`` lines on stderr (one per line of its
    message, its settings named as options (:data:`CLI_NAMES`): a config with several
    mistakes lists them all) and exit code 1.

    On Ctrl-C (or a training run stopped by SIGINT/SIGTERM, which saved a checkpoint and
    says so) print ``interrupted`` and what to do next: ``interrupted`` is a fixed text or a
    function of the command's arguments (e.g. the ``--resume`` command of this run). Exit
    code 128 + the signal (130 for Ctrl-C, 143 for SIGTERM). Use as ``@user_errors`` or
    ``@user_errors(interrupted=...)``."""
    if fn is None:
        return functools.partial(user_errors, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MfcacheError as exc:
            for line in exc.spelled(CLI_NAMES).splitlines() or [""]:
                console.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            hint = interrupted(kwargs) if callable(interrupted) else interrupted
            text = "; ".join(part for part in (str(exc), hint) if part)
            console.print(
                f"[bold red]interrupted[/bold red]{': ' + text if text else ''}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None

    return wrapper


RERUN = "work finished so far is kept; run the same command again to resume"

# A cache is a folder or an object-store URL (s3://bucket/prefix, gs://..., az://...): taken as
# text, since a Path would fold the URL's "//"; cache_place() gives the folder as a Path.
CacheOpt = Annotated[
    str,
    typer.Option(
        "--cache",
        help="Cache written by `mfcache extract`: a folder, or a URL like s3://bucket/caches/x (also gs://, az://).",
    ),
]
CacheArg = Annotated[str | None, typer.Argument(help="Cache folder or URL (or --cache).", show_default=False)]
CacheOrOpt = Annotated[
    str | None, typer.Option("--cache", help="Cache folder or URL, as in the other commands.", show_default=False)
]
LocalCacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--local-cache",
        help="Cache in object storage: keep the chunks read in this local folder, so later epochs "
        "and runs read them from disk.",
        show_default=False,
    ),
]
LocalCacheSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--local-cache-size",
        help="Most the --local-cache folder holds, e.g. 500GB (default 100GB); the chunks "
        "read longest ago are removed first.",
        show_default=False,
    ),
]


def cache_place(where: str, local_cache: Path | None = None, local_cache_size: str | None = None):
    """The cache named on the command line: a ``Path`` for a folder (as always), a
    :class:`~mfcache.cache.location.CacheLocation` for object storage (with its read-through folder)."""
    from mfcache.cache.location import locate

    location = locate(where, local_cache=local_cache, local_cache_size=local_cache_size)
    return location.path if location.is_local else location


def one_cache(positional: str | None, option: str | None):
    """The cache of a command that takes it as ``CACHE`` or ``--cache CACHE`` (either,
    not both, not neither): a folder (``Path``) or a place in object storage."""
    if positional is not None and option is not None and cache_place(positional) != cache_place(option):
        raise MfcacheError(f"two caches given ({positional} and --cache {option}); give one")
    if positional is None and option is None:
        raise MfcacheError("no cache given: pass the cache folder, e.g. `CACHE` or `--cache CACHE`")
    return cache_place(positional if positional is not None else option)


SplitOpt = Annotated[
    str | None, typer.Option("--split", help="Split of the cache (default: train* for training, val* for eval).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. train.steps=500 or head.roi_size=64 (repeatable)."),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="auto (a GPU if there is one), cpu, cuda or cuda:N (shorthand for --set train.device=...)."
    ),
]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", min=1, help="Training steps (shorthand for --set train.steps=N).")
]


def train_overrides(overrides: list[str] | None, *, steps: int | None, device: str | None) -> list[str] | None:
    """``--set`` strings with ``--steps`` / ``--device`` added (after them, so they win)."""
    extra = ([f"train.steps={steps}"] if steps is not None else []) + ([f"train.device={device}"] if device else [])
    return [*(overrides or []), *extra] or None


TRUST_FLAG = "--trust-checkpoint"  # the CLI's spelling of `trust_checkpoint=True` (UntrustedFile)
TrustOpt = Annotated[
    bool,
    typer.Option(
        TRUST_FLAG,
        help="Load checkpoints (and a cache's stored C1 program) with the full unpickler, accepting types beyond "
        "tensors, containers and numbers. RISK: such a file can run any code on this machine; use only for "
        "files from a source you trust.",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the result as one JSON document on stdout, and nothing else there (progress and "
        "messages still go to stderr).",
    ),
]


# ExtractConfig field -> its `mfcache extract` option: the field's own flag, else --field-name
EXTRACT_FLAGS = {
    f.name: f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in dataclasses.fields(ExtractConfig)
}
_CONFIG_KEY = re.compile(r"(?:head|train|eval)\.\w+(?:=\S+)?")  # as --set takes it: train.steps, head.use_c1=false


class OptionNames(Mapping):
    """Setting key (as library messages name it, :mod:`mfcache.errors`) -> how the CLI spells
    it: ``flags``, and any other config key as ``--set`` takes it (`head.use_c1=false` ->
    ``--set head.use_c1=false``; a bare `train.steps` -> ``train.steps``)."""

    def __init__(self, flags: dict[str, str]):
        self.flags = flags

    def __getitem__(self, key: str) -> str:
        if key in self.flags:
            return self.flags[key]
        if _CONFIG_KEY.fullmatch(key):
            return f"--set {key}" if "=" in key else key
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.flags)

    def __len__(self) -> int:
        return len(self.flags)


# The options of the settings library messages name: a stage's keyword as `section.name` (the
# stage function's keyword: extract(skip_bad=...) is `extract.skip_bad`), a keyword several
# stages share, or an ExtractConfig field (`extract.dtype`).
CLI_NAMES = OptionNames(
    {
        **{f"extract.{name}": flag for name, flag in EXTRACT_FLAGS.items()},
        "extract.out": "--out",
        "extract.images": "--images",
        "extract.skip_bad": "--skip-bad",
        "extract.ignore_free_space": "--ignore-free-space",
        "train.run_dir": "--out",
        "train.config": "--head",
        "train.resume": "--resume",
        "evaluate.out": "--out",
        "evaluate.force": "--force",
        "visualize.images_dir": "--images",
        "predict.masks": "--masks",
        "predict.skip_bad": "--skip-bad",
        "predict.recursive": "--recursive",
        "sweep.out_dir": "--out",
        "split": "--split",
        "detector": "--detector",
        "overrides": "--set",
        "local_cache": "--local-cache",
        "local_cache_size": "--local-cache-size",
        "trust_checkpoint=True": TRUST_FLAG,
    }
)
