"""`mfcache verify`: check a cache end to end, reading every chunk of every array.

What is checked, per split (see :mod:`mfcache.cache.schema` for the layout):

- the fingerprint is well formed and the split was fully created (``ready``);
- every array has the planned shape: ``N`` rows (regular arrays) or the planned ragged
  length, trailing dims from the fingerprint;
- the index matches the plan recomputed from the original sizes and the detector's resize
  rule and strides (input sizes, level shapes, offsets), offsets are chunk aligned,
  increasing, non-overlapping and within the ragged arrays;
- completion flags are 0/1/2, set block-wise, and every skipped image has a reason;
- every metadata file parses; every chunk of a written block exists on disk (the writer
  writes all of them), every chunk of every array decodes, float data is finite, and each
  part of each written image (``index/checksum``, :func:`~mfcache.cache.schema.checksum_parts`)
  matches its CRC-32, which catches flipped bytes in uncompressed chunks that zarr reads
  back silently;
- the stored annotation file matches its recorded sha256;
- int8 caches hold exactly the scale arrays (``scales/*``, covered by the checksums), and
  ``memory`` is planned for the stored levels (fingerprint ``extract.levels``).

Problems are collected, not raised, so one run lists all of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from mfcache.cache.location import CacheLocation, locate
from mfcache.cache.reader import Cache
from mfcache.cache.schema import (
    CHECKSUM_ARRAYS,
    DONE,
    IMAGE_ARRAYS,
    RAGGED_ARRAYS,
    SCALE_ARRAYS,
    SKIPPED,
    c1_size,
    checksum_parts,
    image_checksums,
    memory_parts,
    packed_bytes,
    plan_split,
    stored_levels,
)
from mfcache.cache.store import damage
from mfcache.data.views import rows_input_hw
from mfcache.errors import MfcacheError

FINGERPRINT_KEYS = {"schema_version", "detector", "extract", "mfcache_version"}
EXTRACT_KEYS = {"topk", "target_size", "c1", "dtype"}
# Index arrays written whole when the split is created; the rest are written block by block.
STATIC_INDEX = (
    "index/image_id",
    "index/orig_hw",
    "index/input_hw",
    "index/level_hw",
    "index/token_offset",
    "index/c1_offset",
)
SPLIT_ATTRS = ("annotations_sha256", "label_to_category", "chunk_tokens", "c1_chunk", "block_size", "num_images")


@dataclass
class SplitReport:
    name: str
    num_rows: int = 0
    written: int = 0
    skipped: int = 0
    pending: int = 0
    chunks: int = 0
    bytes: int = 0


@dataclass
class VerifyReport:
    """``problems``: one line each, naming split, array, chunk or image; empty = healthy."""

    path: Path
    problems: list[str] = field(default_factory=list)
    splits: list[SplitReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path) -> VerifyReport:
    """Check the cache at ``path``; see the module docstring for what is checked."""
    try:
        location = locate(path)  # a folder or a place in object storage
        report = VerifyReport(location.path if location.is_local else location)
        fp = location.open_group("r").attrs.get("mfcache")
    except MfcacheError:
        raise
    except Exception:
        fp = None  # Cache() below says why
    if isinstance(fp, dict):
        if missing := FINGERPRINT_KEYS - set(fp):
            report.problems.append(f"fingerprint lacks {', '.join(sorted(missing))}")
        elif not isinstance(fp["extract"], dict) or (missing := EXTRACT_KEYS - set(fp["extract"])):
            report.problems.append(f"fingerprint 'extract' lacks {', '.join(sorted(missing or EXTRACT_KEYS))}")
        if report.problems:
            return report
    try:
        cache = Cache(path)
    except MfcacheError as exc:
        report.problems.append(str(exc))
        return report
    except Exception as exc:  # a damaged fingerprint can fail in many ways
        report.problems.append(f"fingerprint of {path} is malformed: {exc!r}")
        return report
    for name in cache.splits:
        try:
            report.splits.append(_verify_split(cache, name, report.problems))
        except Exception as exc:  # damage of a kind the checks above did not foresee: still one line
            report.problems.append(f"split {name}: {damage(exc)}")
    if not cache.splits:
        report.problems.append(f"cache {path} holds no split")
    return report


def _verify_split(cache: Cache, name: str, problems: list[str]) -> SplitReport:
    """Check split ``name``, appending one line per problem to ``problems``. The steps run in
    order; one whose damage makes the later checks meaningless ends the split's checks."""
    out = SplitReport(name)

    def problem(text: str) -> None:
        problems.append(f"split {name}: {text}")

    opened = _open_split(cache, name, problem)
    if opened is None:
        return out
    attrs, arrays = opened
    n = out.num_rows = int(attrs["num_images"])
    ext = cache.fingerprint["extract"]  # its keys were checked by verify()
    if not _check_shapes(arrays, n, cache.detector, ext, problem):
        return out
    index = {key: arrays[key][:] for key in IMAGE_ARRAYS if key.startswith("index/")}
    levels = stored_levels(cache.fingerprint)
    views = cache.settings.views  # rescaled views have their own input sizes (mfcache.data.views)
    input_hw = (
        rows_input_hw(cache.detector.preprocess, index["index/image_id"], index["index/orig_hw"], views)
        if views > 1
        else None
    )
    plan = plan_split(
        index["index/image_id"],
        index["index/orig_hw"],
        cache.detector,
        int(attrs["chunk_tokens"]),
        levels,
        input_hw=input_hw,
    )
    if not _check_scales(arrays, ext, problem):
        return out
    ragged = _ragged_layout(plan, cache.detector, has_c1="c1" in arrays)
    _check_index(arrays, index, plan, ragged, levels, problem)
    _check_flags(index, attrs, problem, out)
    _check_annotations(arrays["annotations"], attrs, problem)
    store_root = cache.location
    _check_blocks(
        arrays, ragged, index, int(attrs["block_size"]), len(cache.detector.strides), levels, store_root, problem, out
    )
    for array_name in STATIC_INDEX:
        _check_chunk_files(arrays[array_name], range(arrays[array_name].cdata_shape[0]), store_root, problem)
    return out


def _open_split(cache: Cache, name: str, problem) -> tuple[dict, dict[str, zarr.Array]] | None:
    """The split's attrs and arrays, or None (reported) if its group metadata is unreadable,
    it was never fully created, or attrs, array metadata or arrays are missing."""
    try:
        group = cache.root[name]
    except Exception as exc:
        problem(f"group metadata {name}/zarr.json {damage(exc)}")
        return None
    attrs = dict(group.attrs)
    if not attrs.get("ready"):
        problem("was never fully created (attrs 'ready' missing): run extract again")
        return None
    if missing := [a for a in SPLIT_ATTRS if a not in attrs]:
        problem(f"attrs lack {', '.join(missing)}")
        return None
    arrays = _open_arrays(group, cache.location, name, problem)
    if arrays is None:
        return None
    if missing := [a for a in IMAGE_ARRAYS if a not in arrays] + [
        a for a in ("memory", "annotations") if a not in arrays
    ]:
        problem(f"arrays missing: {', '.join(missing)}")
        return None
    return attrs, arrays


def _check_shapes(arrays: dict[str, zarr.Array], n: int, det, ext: dict, problem) -> bool:
    """Whether every per-image array has ``n`` rows and the fingerprint's trailing dims."""
    dims = {
        "K": int(ext["topk"]),
        "D": det.d_model,
        "C": det.c1_channels,
        "L": len(det.strides),
        "B": packed_bytes(int(ext["target_size"])),
        "P": len(checksum_parts(len(det.strides))),
    }
    shapes_ok = True
    for array_name, (_, trailing, _) in IMAGE_ARRAYS.items():
        want = (n, *(dims[t] if isinstance(t, str) else t for t in trailing))
        if arrays[array_name].shape != want:
            problem(f"{array_name} has shape {arrays[array_name].shape}, expected {want} (index/array length mismatch)")
            shapes_ok = False
    return shapes_ok


def _check_scales(arrays: dict[str, zarr.Array], ext: dict, problem) -> bool:
    """Whether the split holds exactly the scale arrays its dtype needs (int8: all, for the
    arrays it stores; otherwise none)."""
    have_scales = sorted(k for k in arrays if k.startswith("scales/"))
    want_scales = sorted(k for k in SCALE_ARRAYS if ext["dtype"] == "int8" and (k != "scales/c1" or "c1" in arrays))
    if have_scales != want_scales:
        problem(f"scale arrays {have_scales}, expected {want_scales} for dtype {ext['dtype']}")
        return False
    return True


def _ragged_layout(plan, det, *, has_c1: bool) -> dict[str, tuple]:
    """``{ragged array: (offset index array, planned offsets, chunk rows, width)}``."""
    ragged = {"memory": ("index/token_offset", plan.token_offset, plan.chunk_tokens, det.d_model)}
    if has_c1:
        ragged["c1"] = ("index/c1_offset", plan.c1_offset, plan.c1_chunk, det.c1_channels)
    return ragged


def _check_index(arrays: dict[str, zarr.Array], index: dict, plan, ragged: dict, levels, problem) -> None:
    """The index against the plan: input sizes and level shapes as the detector's resize rule
    and strides give them; the ragged arrays' widths, chunking and lengths; their offsets
    chunk aligned, non-overlapping, within the array and as planned."""
    n = len(index["index/image_id"])
    for key, planned in (("index/input_hw", plan.input_hw), ("index/level_hw", plan.level_hw)):
        bad = np.flatnonzero((index[key] != planned).reshape(n, -1).any(1))
        if len(bad):
            problem(f"{key} differs from the detector's resize rule and strides at {_positions(bad, index)}")
    counts = {"memory": plan.level_hw[:, levels].prod(-1).sum(-1), "c1": c1_size(plan.input_hw).prod(-1)}
    for array_name, (key, planned, chunk, width) in ragged.items():
        offsets, length = index[key].astype(np.int64), arrays[array_name].shape[0]
        if arrays[array_name].shape[1:] != (width,):
            problem(f"{array_name} has {arrays[array_name].shape[1:]} columns, expected ({width},)")
        if arrays[array_name].chunks[0] != chunk:
            problem(f"{array_name} chunks {arrays[array_name].chunks[0]} rows, attrs say {chunk}")
        if length != planned[-1]:
            problem(f"{array_name} has {length} rows, the index plans {planned[-1]} (index/array length mismatch)")
        end = offsets + counts[array_name]
        checks = {
            "not chunk aligned": offsets % chunk != 0,
            "overlapping the next image": np.append(end[:-1] > offsets[1:], False),
            "beyond the array": end > length,
            "not the planned offset": offsets != planned[:-1],
        }
        for what, bad in checks.items():
            if bad.any():
                problem(f"{key} {what} at {_positions(np.flatnonzero(bad), index)}")


def _check_flags(index: dict, attrs: dict, problem, out: SplitReport) -> None:
    """Completion flags are 0/1/2 and every skipped image has a reason; counts them into ``out``."""
    done = index["index/done"]
    if (bad := np.flatnonzero(~np.isin(done, (0, DONE, SKIPPED)))).size:
        problem(f"index/done has invalid values at {_positions(bad, index)}")
    reasons = attrs.get("skipped", {})
    lost = [int(i) for i in index["index/image_id"][done == SKIPPED] if str(int(i)) not in reasons]
    if lost:
        problem(f"skipped images without a recorded reason: ids {lost[:10]}")
    out.written, out.skipped, out.pending = (
        int((done == DONE).sum()),
        int((done == SKIPPED).sum()),
        int((done == 0).sum()),
    )


def _check_annotations(stored: zarr.Array, attrs: dict, problem) -> None:
    """The stored annotation file is readable and matches its recorded sha256."""
    try:
        digest = hashlib.sha256(stored[:].tobytes()).hexdigest()
        if digest != attrs["annotations_sha256"]:
            problem("stored annotation file does not match its recorded sha256")
    except Exception as exc:
        problem(f"annotations unreadable: {exc}")


def _check_blocks(
    arrays, ragged, index, block: int, num_levels: int, levels, store_root: CacheLocation, problem, out: SplitReport
) -> None:
    """Block by block: flags set block-wise, every chunk of a written block on disk and
    decodable (:func:`_read_block`), and each written image's parts matching their CRC-32."""
    done, n = index["index/done"], len(index["index/done"])
    for start in range(0, n, block):
        stop = min(start + block, n)
        flags = done[start:stop]
        if flags.any() and not flags.all():
            problem(f"block {start}..{stop - 1} is partly marked done {flags.tolist()}")
        rows = _read_block(arrays, ragged, index, start, stop, bool(flags.any()), store_root, problem, out, levels)
        if rows is not None:
            _check_checksums(rows, index, start, stop, num_levels, levels, problem)


def _check_checksums(rows: dict, index: dict, start: int, stop: int, num_levels: int, levels, problem) -> None:
    """Each written image of block ``start:stop`` (``rows``, as :func:`_read_block` read it):
    every part's CRC-32 against ``index/checksum``."""
    names = checksum_parts(num_levels)
    for i in range(start, stop):
        if index["index/done"][i] != DONE:
            continue
        parts = {k: v[i - start] for k, v in rows.items() if k in CHECKSUM_ARRAYS and k != "memory"}
        parts.update(memory_parts(rows["memory"][i - start], index["index/level_hw"][i], levels))
        bad = [names[k] for k in np.flatnonzero(image_checksums(parts, num_levels) != index["index/checksum"][i])]
        if bad:
            problem(
                f"image id {int(index['index/image_id'][i])} (position {i}): checksum mismatch in "
                f"{', '.join(bad)}, its stored data changed after writing (flipped bytes or a lost chunk)"
            )


def _read_block(arrays, ragged, index, start, stop, written, store_root, problem, out, levels):
    """Every array's rows of images ``start:stop`` (ragged: a list of each image's valid
    rows), or None if any chunk is missing or unreadable (each reported)."""
    rows: dict = {}
    ok = True
    for array_name in [*CHECKSUM_ARRAYS, "index/done", "index/checksum"]:
        if array_name not in arrays:
            continue
        array = arrays[array_name]
        if array_name in ragged:
            key, planned, chunk, _ = ragged[array_name]
            lo, hi = int(planned[start]), int(planned[stop])
        else:
            lo, hi, chunk = start, stop, array.chunks[0]
        if not written and array_name not in STATIC_INDEX:
            continue  # a block not written yet: its chunks may be absent or half there
        if array_name not in STATIC_INDEX:  # the writer wrote every chunk of the block
            if not _check_chunk_files(array, range(lo // chunk, -(-hi // chunk)), store_root, problem):
                ok = False
                continue
        try:
            data = array[lo:hi]
        except Exception as exc:
            problem(f"{array_name} rows {lo}..{hi - 1}: unreadable chunk ({damage(exc)})")
            ok = False
            continue
        out.chunks += -(-(hi - lo) // chunk)
        out.bytes += data.nbytes
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            problem(f"{array_name} rows {lo}..{hi - 1}: {bad} non-finite values")
        if array_name in ragged:
            key = ragged[array_name][0]
            count = {
                "memory": index["index/level_hw"][start:stop][:, levels].prod(-1).sum(-1),
                "c1": c1_size(index["index/input_hw"][start:stop]).prod(-1),
            }[array_name]
            offs = index[key][start:stop].astype(np.int64) - lo
            rows[array_name] = [data[o : o + c] for o, c in zip(offs, count)]
        else:
            rows[array_name] = data
    return rows if ok else None


def _open_arrays(group: zarr.Group, location: CacheLocation, split: str, problem) -> dict[str, zarr.Array] | None:
    """Every array of the split that exists in the store, opened; None if any metadata file is
    unreadable (each reported)."""
    arrays = {}
    present = [
        a
        for a in [*IMAGE_ARRAYS, *RAGGED_ARRAYS, *SCALE_ARRAYS, "annotations"]
        if location.has(f"{split}/{a}/zarr.json")
    ]
    for array_name in present:
        try:
            arrays[array_name] = group[array_name]
        except Exception as exc:
            problem(f"array {array_name}: metadata {array_name}/zarr.json {damage(exc)}")
    return arrays if len(arrays) == len(present) else None


def _check_chunk_files(array: zarr.Array, chunks, store_root: CacheLocation, problem) -> bool:
    """Report chunk files (along axis 0) missing from disk; True if all are there."""
    ok = True
    extra = (0,) * (array.ndim - 1)
    for k in chunks:
        key = array.metadata.encode_chunk_key((k, *extra))
        if not store_root.has(f"{array.path}/{key}"):
            problem(f"{array.path}: chunk file {key} is missing")
            ok = False
    return ok


def _positions(bad: np.ndarray, index: dict) -> str:
    ids = index["index/image_id"][bad[:5]].tolist()
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"image ids {ids}{more}"
