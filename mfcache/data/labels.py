"""Detector labels -> dataset categories: by name, through a label map, or class-agnostic.

The mode is chosen at extraction and recorded in the cache fingerprint (``extract.label_map``),
so a cache made with another mapping is another cache:

- **by name** (the default, ``None``): a detector label maps to the dataset category of the
  same name; labels the dataset lacks map to nothing.
- **a label map** (``extract --label-map FILE``, the file's JSON object): ``{"detector label":
  category}``, the category given by name (a JSON string) or by id (a JSON integer), or
  ``null`` to drop a label. Labels the file leaves out still map by name; several labels may
  map to one category (a query listed under two of them is reported once,
  :func:`mfcache.stages.postprocess.kept_queries`).
- **class-agnostic** (``extract --class-agnostic``, :data:`AGNOSTIC`): every detection is a
  candidate whatever its label (a sigmoid detector's query is cached once, under its best
  label), results carry the one category :data:`AGNOSTIC_CATEGORY`, and eval scores every
  GT instance as one class (pycocotools ``useCats = 0``).

Training targets never depend on the mode: a query trains on the GT instance its box
overlaps most, whatever either's class (:mod:`mfcache.cache.targets`).

Detections whose label maps to nothing are never reported; dataset categories no label maps
to can never be predicted, and extraction warns about them (:func:`unmapped_warning`).
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mfcache.errors import MfcacheError

AGNOSTIC = "agnostic"  # extract.label_map of a class-agnostic cache
AGNOSTIC_CATEGORY = (1, "object")  # (id, name) every class-agnostic result carries
LabelMap = dict[str, str | int | None]  # detector label -> category name | category id | None (dropped)
MAP_HINT = (  # the fix an error names, in setting keys (mfcache.errors)
    'map detector labels to them with `extract.label_map` FILE (JSON {"detector label": "category name or id"}) '
    "or extract with `extract.class_agnostic`"
)
# the same fix in the warning extract prints (a warning is not spelled for the CLI: it names the options)
MAP_HINT_OPTIONS = (
    'map detector labels to them with --label-map FILE (JSON {"detector label": "category name or id"}) '
    "or extract with --class-agnostic"
)


def chosen_label_map(label_map_file: str | Path | None, class_agnostic: bool) -> LabelMap | str | None:
    """``extract``'s label mode from its options: None (by name), :data:`AGNOSTIC` or the
    file's map (:func:`read_label_map`); the two options exclude each other."""
    if label_map_file and class_agnostic:
        raise MfcacheError(
            "`extract.label_map` and `extract.class_agnostic` exclude each other: class-agnostic results carry "
            "one category whatever the detector's labels"
        )
    if class_agnostic:
        return AGNOSTIC
    return read_label_map(label_map_file) if label_map_file else None


def read_json_option(path: str | Path, where: str):
    """The JSON document of an option's file (``where`` names the option and file in errors):
    a missing, unreadable or malformed file is one-line :class:`MfcacheError`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MfcacheError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MfcacheError(f"{where}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise MfcacheError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def read_label_map(path: str | Path) -> LabelMap:
    """The JSON object of ``--label-map`` ``path``, its shape checked (string keys; string,
    integer or null values); one-line :class:`MfcacheError` otherwise. Names are checked
    against the detector and the dataset by :func:`resolve_labels`."""
    where = f"`extract.label_map` {path}"
    data = read_json_option(path, where)
    if not isinstance(data, dict) or not data:
        raise MfcacheError(
            f'{where}: expected a non-empty JSON object {{"detector label": "dataset category"}}, '
            f"got {type(data).__name__ if not isinstance(data, dict) else 'an empty object'}"
        )
    bad = [k for k, v in data.items() if not (v is None or isinstance(v, str) or type(v) is int)]
    if bad:
        raise MfcacheError(
            f"{where}: the value of {', '.join(map(repr, bad[:5]))} must be a category name "
            "(string), a category id (integer) or null (drop the label)"
        )
    return data


@dataclass(frozen=True)
class LabelMapping:
    """How one split's detector labels become the categories its results carry.

    label_to_category: ``[num labels]`` category id per detector label, -1 = none;
    agnostic: the class-agnostic mode (every id is :data:`AGNOSTIC_CATEGORY`'s);
    unmapped: ``{dataset category id: non-crowd GT instances}`` of the categories no label maps to.
    """

    label_to_category: list[int]
    agnostic: bool
    unmapped: dict[int, int]


def resolve_labels(
    label_names: tuple[str, ...],
    categories: dict[int, str],
    label_map: LabelMap | str | None,
    annotations: list[dict],
    *,
    source: str = "`extract.label_map`",
) -> LabelMapping:
    """The :class:`LabelMapping` of a detector (``label_names``) on a dataset (``categories``
    ``{id: name}``, ``annotations`` its COCO annotations) under ``label_map`` (None, a
    :data:`LabelMap` or :data:`AGNOSTIC`). Unknown labels or categories in the map, or a
    mapping that reaches no category at all, raise one line naming ``source``."""
    if label_map == AGNOSTIC:
        return LabelMapping([AGNOSTIC_CATEGORY[0]] * len(label_names), True, {})
    by_name = _by_name(categories)
    mapping = [by_name.get(name, -1) for name in label_names]
    if label_map:
        for label, target in _checked_map(label_names, categories, label_map, source).items():
            mapping[label_names.index(label)] = target
    if all(m == -1 for m in mapping):
        raise MfcacheError(
            f"none of the detector's labels ({_listed(label_names)}) {'is mapped to' if label_map else 'names'} "
            f"a category of the dataset ({_listed(list(categories.values()))}); {MAP_HINT}"
        )
    instances, reached = Counter(a["category_id"] for a in annotations if not a.get("iscrowd")), set(mapping)
    unmapped = {cid: instances.get(cid, 0) for cid in sorted(categories) if cid not in reached}
    return LabelMapping(mapping, False, unmapped)


def _by_name(categories: dict[int, str]) -> dict[str, int]:
    """Category name -> id; a name several categories share is ambiguous (maps to none)."""
    counts = Counter(categories.values())
    return {name: cid for cid, name in categories.items() if counts[name] == 1}


def _checked_map(
    label_names: tuple[str, ...], categories: dict[int, str], label_map: LabelMap, source: str
) -> dict[str, int]:
    """``label_map`` with every category resolved to its id (-1 for null); every problem
    (unknown label, unknown or ambiguous category) in one :class:`MfcacheError` line."""
    by_name, problems, resolved = _by_name(categories), [], {}
    for label, target in label_map.items():
        if label not in label_names:
            close = difflib.get_close_matches(label, label_names, n=1)
            problems.append(f"{label!r} is not a detector label" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif target is None:
            resolved[label] = -1
        elif isinstance(target, int):
            if target in categories:
                resolved[label] = target
            else:
                problems.append(f"{label!r} -> {target}: no category has id {target}")
        elif target in by_name:
            resolved[label] = by_name[target]
        else:
            shared = sorted(cid for cid, name in categories.items() if name == target)
            close = difflib.get_close_matches(target, list(categories.values()), n=1)
            problems.append(
                f"{label!r} -> {target!r}: "
                + (
                    f"categories {shared} share that name, give its id"
                    if shared
                    else "no such dataset category" + (f" (did you mean {close[0]!r}?)" if close else "")
                )
            )
    if problems:
        raise MfcacheError(
            f"{source}: {'; '.join(problems)}; the detector's labels are {_listed(label_names)}, "
            f"the dataset's categories {_listed([f'{n} ({c})' for c, n in sorted(categories.items())])}"
        )
    return resolved


def _listed(names, shown: int = 8) -> str:
    names = list(names)
    return ", ".join(map(str, names[:shown])) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def unmapped_warning(mapping: LabelMapping, categories: dict[int, str]) -> str | None:
    """One line naming the dataset categories no detector label maps to and their GT
    instances (they can never be predicted, so count as misses), with the fix; None if none."""
    if not mapping.unmapped:
        return None
    most = sorted(mapping.unmapped.items(), key=lambda item: (-item[1], item[0]))  # the costliest first
    parts = [f"{categories[cid]!r} (id {cid}, {n} GT instances)" for cid, n in most]
    held = sum(mapping.unmapped.values())
    return (
        f"{len(parts)} of {len(categories)} dataset categories have no detector label mapped to them and can "
        f"never be predicted ({held} GT instances count as misses): {_listed(parts)}; {MAP_HINT_OPTIONS}"
    )


def describe_labels(label_names: tuple[str, ...], attrs: dict, label_map: LabelMap | str | None) -> dict:
    """A split's label mapping as plain data (``mfcache inspect``)::

    {"mode": "by name" | "label map" | "class-agnostic",
     "pairs": [{"label", "category_id", "category"}] (labels that map to a category),
     "unmapped_labels": [label, ...],
     "unmapped_categories": [{"id", "name", "instances"}] (instances None if not recorded)}
    """
    names = {int(k): v for k, v in attrs.get("category_names", {}).items()}
    agnostic = label_map == AGNOSTIC
    if agnostic:
        names = {AGNOSTIC_CATEGORY[0]: AGNOSTIC_CATEGORY[1]}
    mapping = list(attrs.get("label_to_category", []))
    pairs = [
        {"label": label, "category_id": cid, "category": names.get(cid, str(cid))}
        for label, cid in zip(label_names, mapping)
        if cid >= 0
    ]
    recorded = {int(k): v for k, v in attrs.get("unmapped_categories", {}).items()}
    unmapped = (
        []
        if agnostic
        else [
            {"id": cid, "name": name, "instances": recorded.get(cid)}
            for cid, name in sorted(names.items())
            if cid not in set(mapping)
        ]
    )
    return {
        "mode": "class-agnostic" if agnostic else "label map" if label_map else "by name",
        "pairs": pairs,
        "unmapped_labels": [label for label, cid in zip(label_names, mapping) if cid < 0],
        "unmapped_categories": unmapped,
    }


def describe_map(label_map: LabelMap | str | None) -> str:
    """``labels by name`` | ``class-agnostic labels`` | ``label map {"a": "b", ...}`` (shortened)."""
    if label_map is None:
        return "labels by name"
    if label_map == AGNOSTIC:
        return "class-agnostic labels"
    text = json.dumps(label_map, sort_keys=True)
    return "label map " + (text if len(text) <= 80 else text[:77] + "...")


def describe_change(have: LabelMap | str | None, wanted: LabelMap | str | None) -> str:
    """Why a cache's label mapping ``have`` is not ``wanted``, in one line."""
    if isinstance(have, dict) and isinstance(wanted, dict):
        differ = [k for k in {**have, **wanted} if have.get(k, "(by name)") != wanted.get(k, "(by name)")]
        shown = ", ".join(
            f"{k!r}: {json.dumps(have.get(k, '(by name)'))} in the cache, "
            f"{json.dumps(wanted.get(k, '(by name)'))} asked for"
            for k in differ[:3]
        )
        return f"another label map ({shown}{', ...' if len(differ) > 3 else ''})"
    return f"{describe_map(have)} (asked for {describe_map(wanted)})"
