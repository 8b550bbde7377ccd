"""Text prompts of open-vocabulary detectors (Grounding DINO, MM Grounding DINO, OmDet-Turbo).

Such a detector's classes are phrases: its labels *are* the phrases, so detections map to
dataset categories by name like any detector's labels (:mod:`mfcache.data.labels`), and the
phrases are recorded in the cache fingerprint (``detector.prompts``): a cache made with
another prompt is another cache. ``extract`` builds the prompt

- by default from the dataset's category names, in category-id order;
- from ``--prompts FILE``, a JSON file of one of two forms:

  - a **list** of phrases, ``["person", "bicycle", ...]``: the prompt as written; phrases that
    name no dataset category map to none (or through ``--label-map``);
  - an **object** ``{"category name": "phrase"}``: the phrase to ask for each named category
    (``null`` leaves the category out of the prompt); categories it leaves out are asked for
    by their own name, all in category-id order. A phrase that differs from its category's
    name maps to that category (an implied ``--label-map`` entry; an explicit ``--label-map``
    wins).

Phrases must be non-empty and distinct (ignoring case: the models lowercase them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mfcache.data.labels import AGNOSTIC, LabelMap, read_json_option
from mfcache.errors import MfcacheError

PromptFile = list[str] | dict[str, str | None]  # the two forms of --prompts FILE
SHOWN = 6  # phrases named in one-line messages


def read_prompts(path: str | Path) -> PromptFile:
    """The JSON of ``--prompts`` ``path``, its shape checked (a non-empty list of strings, or
    an object of strings or nulls); one-line :class:`MfcacheError` otherwise."""
    where = f"`extract.prompts` {path}"
    data = read_json_option(path, where)
    if isinstance(data, list) and data and all(isinstance(v, str) for v in data):
        return data
    if isinstance(data, dict) and data and all(v is None or isinstance(v, str) for v in data.values()):
        return data
    raise MfcacheError(
        f'{where}: expected a non-empty JSON list of phrases ["phrase", ...] or an object '
        '{"category name": "phrase" or null}'
    )


def check_phrases(phrases: Sequence[str], where: str = "the prompt") -> tuple[str, ...]:
    """``phrases`` stripped, refused (one line naming ``where``) if empty, blank or repeated."""
    out = tuple(str(p).strip() for p in phrases)
    if not out:
        raise MfcacheError(f"{where}: no phrases")
    if any(not p for p in out):
        raise MfcacheError(f"{where}: phrase {out.index('') + 1} is blank")
    seen: dict[str, str] = {}
    for p in out:
        if p.lower() in seen:
            raise MfcacheError(
                f"{where}: phrases {seen[p.lower()]!r} and {p!r} are the same to the model "
                "(it lowercases them); each class needs its own phrase"
            )
        seen[p.lower()] = p
    return out


def prompt_phrases(
    prompts: PromptFile | None, categories: dict[int, str], *, where: str = "`extract.prompts`"
) -> tuple[tuple[str, ...], LabelMap]:
    """The phrases of the prompt and the label map they imply (phrase -> category id, for the
    phrases of an object-form file that differ from their category's name), from the file's
    ``prompts`` (None: the category names) and the dataset's ``categories`` ``{id: name}``."""
    if prompts is None:
        return check_phrases([categories[c] for c in sorted(categories)], "the dataset's category names"), {}
    if isinstance(prompts, list):
        return check_phrases(prompts, where), {}
    names = {name: cid for cid, name in categories.items()}
    unknown = [k for k in prompts if k not in names]
    if unknown:
        raise MfcacheError(
            f"{where}: {', '.join(map(repr, unknown[:SHOWN]))} "
            f"{'is not a dataset category' if len(unknown) == 1 else 'are not dataset categories'}; "
            f"the categories are {', '.join(categories[c] for c in sorted(categories))}"
        )
    asked = [(cid, prompts.get(categories[cid], categories[cid])) for cid in sorted(categories)]
    asked = [(cid, phrase) for cid, phrase in asked if phrase is not None]
    phrases = check_phrases([phrase for _, phrase in asked], where)
    implied = {phrase: cid for (cid, _), phrase in zip(asked, phrases) if phrase != categories[cid]}
    return phrases, implied


def with_implied_map(label_map: LabelMap | str | None, implied: LabelMap) -> LabelMap | str | None:
    """The label mode after an object-form prompt file: its implied entries under the user's
    ``--label-map`` (whose entries win); class-agnostic stays class-agnostic."""
    if label_map == AGNOSTIC or not implied:
        return label_map
    return {**implied, **(label_map or {})}


def describe_prompt(phrases: Sequence[str]) -> str:
    """``"ring", "star", ... (80 phrases)`` for one-line messages."""
    shown = ", ".join(json.dumps(p) for p in list(phrases)[:SHOWN])
    return shown + (f", ... ({len(phrases)} phrases)" if len(phrases) > SHOWN else "")


def describe_prompt_change(have: Sequence[str], wanted: Sequence[str]) -> str:
    """Why a cache made with prompt ``have`` is not one with ``wanted``, in one line."""
    have, wanted = list(have), list(wanted)
    if not have or not wanted:
        return (
            f"{'no prompt' if not have else 'prompt ' + describe_prompt(have)} (asked for "
            f"{'no prompt' if not wanted else 'prompt ' + describe_prompt(wanted)})"
        )
    first = next((i for i, (a, b) in enumerate(zip(have, wanted)) if a != b), min(len(have), len(wanted)))
    if first < min(len(have), len(wanted)):
        why = f"phrase {first + 1} is {have[first]!r} in the cache, {wanted[first]!r} asked for"
    else:
        why = f"{len(have)} phrases in the cache, {len(wanted)} asked for"
    return f"another prompt ({why}; the cache's: {describe_prompt(have)})"
