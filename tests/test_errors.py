"""Errors name settings by key (mfcache/errors.py): the library's messages in Python terms, the
CLI's in its options. Read from the source with ``ast``: a message that names a ``--flag``, or a
setting key the CLI cannot spell, fails here with its file and line."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from mfcache.cli.common import CLI_NAMES, TRUST_FLAG
from mfcache.config import SECTIONS
from mfcache.errors import MfcacheError, UntrustedFile, spelled

PACKAGE = Path(__file__).resolve().parents[1] / "mfcache"
# the front end, and the demo detector's own argparse programs
NOT_LIBRARY = {"cli", "demo_detector"}

# Library text that names options and is no error message: a warning and the storage plan line
# extract prints (not spelled for the CLI; they keep its options).
NOT_ERRORS = ("with --label-map FILE", ", --c1 auto")

FLAG = re.compile(r"(?<![\w-])--[a-z]")
QUOTED = re.compile(r"`([^`\n]+)`")
KEY = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)?(?:=\S+)?")  # `split`, `extract.out`, `head.use_c1=false`
COMMAND = re.compile(r"`mfcache [^`]*`")  # a command named in backquotes, options and all


def library_texts():
    """``(place, text)`` of every string constant of the library (mfcache/ but the CLI and the
    demo detector) but docstrings and the help of config fields (``option(help=..., flag=...)``:
    the CLI's option help)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in NOT_LIBRARY:
            continue
        tree = ast.parse(path.read_text())
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0] if node.body else None
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    skip.add(id(first.value))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "option":
                skip |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node.value


def test_library_messages_name_no_flags():
    named = [
        f"{place}: {text!r}"
        for place, text in library_texts()
        if FLAG.search(COMMAND.sub("", text)) and not any(allowed in text for allowed in NOT_ERRORS)
    ]
    assert not named, "library text names CLI flags (name the setting's key in backquotes):\n" + "\n".join(named)


def test_every_setting_a_message_names_has_a_cli_spelling():
    keys = {
        (place, key)
        for place, text in library_texts()
        for key in QUOTED.findall(text.replace("``", ""))
        if KEY.fullmatch(key)
    }
    assert {key for _, key in keys} >= {"extract.out", "split", "trust_checkpoint=True", "head.use_c1=false"}
    unspelled = sorted(f"{place}: `{key}`" for place, key in keys if key not in CLI_NAMES)
    assert not unspelled, "settings with no CLI spelling (add them to CLI_NAMES):\n" + "\n".join(unspelled)
    fields = {f"{section}.{f.name}" for cls, section in SECTIONS.items() for f in dataclasses.fields(cls)}
    unknown = sorted(
        f"{place}: `{key}`"
        for place, key in keys
        if key not in CLI_NAMES.flags and key.partition("=")[0] not in fields  # a config key: a real field
    )
    assert not unknown, "config keys that are no config field:\n" + "\n".join(unknown)


def test_cli_names_are_options_of_the_commands():
    import typer.main

    from mfcache.cli.main import app

    def options(command):
        for sub in getattr(command, "commands", {}).values():
            yield from options(sub)
        for param in command.params:
            yield from param.opts

    real = set(options(typer.main.get_command(app)))
    flags = {key: CLI_NAMES[key].split()[0] for key in CLI_NAMES if key != "extract.chunk_tokens"}  # not an option
    assert {key: flag for key, flag in flags.items() if flag not in real} == {}


def test_spelled_replaces_the_named_settings_and_keeps_other_quoted_text():
    names = {"extract.out": "--out", "split": "--split"}
    message = "cache x has splits a, b: choose one with `split`, or `extract.out`; see `mfcache inspect x`"
    assert (
        spelled(message, names) == "cache x has splits a, b: choose one with --split, or --out; see `mfcache inspect x`"
    )
    assert spelled("`evaluate.force` and `split`", {}) == "`evaluate.force` and `split`"
    assert spelled("line `split` one\nline `split` two", names) == "line --split one\nline --split two"
    error = MfcacheError("pass `extract.skip_bad` to go on")
    assert str(error) == "pass `extract.skip_bad` to go on"  # what Python users read
    assert error.spelled(CLI_NAMES) == "pass --skip-bad to go on"


@pytest.mark.parametrize(
    "key, cli",
    [
        ("head.use_c1=false", "--set head.use_c1=false"),
        ("train.eval_every=N", "--set train.eval_every=N"),
        ("eval.amp=bf16", "--set eval.amp=bf16"),
        ("train.steps", "train.steps"),  # a config key named bare: as --set names it
        ("train.resume", "--resume"),  # a stage's keyword: named, not a config override
        ("train.run_dir", "--out"),
        ("extract.c1", "--c1"),  # ExtractConfig fields: their option (the field's flag, else --field-name)
        ("extract.num_workers", "--workers"),
        ("extract.view_crop", "--view-crop"),
    ],
)
def test_the_cli_spells_config_keys_as_options_or_set(key, cli):
    assert CLI_NAMES[key] == cli
    assert MfcacheError(f"use `{key}`").spelled(CLI_NAMES) == f"use {cli}"


def test_only_run_config_sections_are_overrides():
    for key in ("evaluate.out=x", "extract.dtype=int8", "mfcache extract", "trust_checkpoint"):
        assert key not in CLI_NAMES
        assert MfcacheError(f"use `{key}`").spelled(CLI_NAMES) == f"use `{key}`"


def test_an_untrusted_file_names_the_setting_each_front_end_spells():
    error = UntrustedFile("checkpoint x asks for os.system")
    assert isinstance(error, MfcacheError) and error.refusal == "checkpoint x asks for os.system"
    assert "pass `trust_checkpoint=True` (the file can then run any code" in str(error)
    cli = error.spelled(CLI_NAMES)
    assert f"if you trust its source, pass {TRUST_FLAG} (the file" in cli and "trust_checkpoint" not in cli
