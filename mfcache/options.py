"""Declaring a config field: :func:`option` (its help, its allowed values) and the range
checks it is built from. :mod:`mfcache.config` declares every field with it; the range check,
the heads builder's choices and the CLI options all read what it records."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import field

Check = Callable[[object], str | None]  # a value -> what is wrong with it, None if fine


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Check:
    return lambda v: (
        None if _number(v) and v >= low else f"must be {'' if _number(v) else 'a finite number '}>= {low:g}"
    )


def above(low: float) -> Check:
    return lambda v: None if _number(v) and v > low else f"must be {'' if _number(v) else 'a finite number '}> {low:g}"


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    def check(v):
        ok = _number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        return None if ok else f"must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    return check


def one_of(*choices) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def each(check: Check) -> Check:
    """A check of every item of a tuple."""

    def check_all(values):
        problems = [p for p in map(check, values) if p]
        return f"must have every item {problems[0].removeprefix('must be ')}" if problems else None

    return check_all


def anything(_value) -> None:
    return None


def distinct_names(v) -> str | None:  # e.g. train.categories: distinct non-empty names
    ok = all(isinstance(n, str) and n.strip() for n in v) and len(set(v)) == len(v)
    return None if ok else "must be distinct non-empty names"


def run_name(v) -> str | None:  # a sweep makes a folder of this name
    return (
        None
        if v and v not in (".", "..") and not re.search(r"[/\\]", v)
        else "must be a non-empty folder name (no / or \\)"
    )


def device_name(v) -> str | None:
    return None if re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", v) else "must be auto, cpu, cuda or cuda:N"


def _prose(choices: dict[object, str]) -> str:
    """``{"a": "", "b": "note", "c": ""}`` -> ``a, b (note) or c``."""
    items = [f"{value} ({note})" if note else str(value) for value, note in choices.items()]
    return " or ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def option(
    default,
    *,
    help: str = "",
    choices: tuple | dict | None = None,
    low: float | None = None,
    check: Check | None = None,
    flag: str | None = None,
):
    """A config field that carries its description and its allowed values (one of ``choices``,
    a dict mapping each value to a note for the help; a number ``>= low``; or any other
    ``check``), so the range check, the heads builder (:data:`mfcache.config.HEAD_CHOICES`)
    and the CLI options (``mfcache/cli/extract.py``: help, lower bound, ``flag`` when it is not
    ``--field-name``) all read them from here. ``{choices}`` in ``help`` becomes the choices
    as prose. For a tuple field (tuple default) ``choices`` and ``low`` apply to every item;
    a ``check`` sees the whole tuple."""
    if sum(x is not None for x in (choices, low, check)) != 1:
        raise TypeError("option() takes exactly one of choices, low or check")
    if choices is not None:
        notes = choices if isinstance(choices, dict) else dict.fromkeys(choices, "")
        choices = tuple(notes)
        help = help.replace("{choices}", _prose(notes))
        check = one_of(*choices)
    elif low is not None:
        check = at_least(low)
    if isinstance(default, tuple) and (choices is not None or low is not None):  # to every item
        check = each(check)
    return field(default=default, metadata={"help": help, "choices": choices, "min": low, "check": check, "flag": flag})


def machine_workers() -> int:
    """Data-loading processes for this machine: half its cores, at least 2 (on 2 cores two
    readers overlap each other and the step, measured) and at most 8."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))
