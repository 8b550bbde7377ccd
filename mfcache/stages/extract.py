"""Stage 1: run the frozen detector once over a COCO split and cache what the heads need.

Resumable by construction: images are written in blocks whose ``done`` flags are set
last, so running the same command again skips every finished block. SIGINT, SIGTERM or
SIGUSR1 (:mod:`mfcache.stopping`) stop it after the batch in progress, with every finished
block written.
"""

from __future__ import annotations

import errno
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

from mfcache.cache.c1_stem import STEM_ARRAY, c1_note, export_detector_stem, resolve_c1
from mfcache.cache.location import CacheLocation, describe_store_error, locate
from mfcache.cache.lock import writer_lock
from mfcache.cache.records import ImageRecord, image_record, image_sample
from mfcache.cache.sample import Sample
from mfcache.cache.schema import SKIPPED, SplitPlan, fingerprint, format_bytes, plan_split, storage_plan
from mfcache.cache.stats import STATS_ATTR, MatchStats, group_stats, stored_stats
from mfcache.cache.writer import (
    BackgroundWriter,
    BlockWriter,
    create_split,
    open_root,
    remove_partial_writes,
    stored_fingerprint,
)
from mfcache.config import ExtractConfig, check_config
from mfcache.data.coco import CocoDataset, GroundTruth
from mfcache.data.image_source import DecodedRow, ImageSource, UnreadableRow
from mfcache.data.labels import LabelMap, chosen_label_map, resolve_labels, unmapped_warning
from mfcache.data.prompts import PromptFile, prompt_phrases, read_prompts, with_implied_map
from mfcache.data.views import rows_frames, rows_input_hw
from mfcache.detectors import load_detector, run_detector
from mfcache.detectors.base import Detector, select_topk
from mfcache.distributed import World, all_max, all_sum, close_world, init_world, together
from mfcache.errors import MfcacheError
from mfcache.outputs import check_folder
from mfcache.runtime import console, progress_bar, resolve_device
from mfcache.stopping import Interrupted, StopSignals, ignore_stop_signals, worker_batches

WRITE_QUEUE = 2  # finished blocks waiting for the writer thread before the detector waits


@dataclass
class ExtractSummary:
    """Counts are cache rows: ``num_rows`` rows = dataset images x ``views``."""

    split: str
    num_rows: int
    written: int
    cache: Path | CacheLocation  # a folder, or the cache's place in object storage
    skipped: int = 0
    annotations: str = ""  # what loading did to the annotations (derived, left out), one line or ''
    skipped_annotations: int = 0
    match: MatchStats | None = None  # GT coverage of the finished split (None while it is incomplete)
    c1: str = "store"  # the C1 policy the cache is made with (--c1 auto resolved)
    views: int = 1  # rows per dataset image (extract --views)

    def rows_line(self) -> str:
        """``400 images`` or ``400 images x 4 views (1600 rows)``: what the split holds."""
        if self.views == 1:
            return f"{self.num_rows} images"
        return f"{self.num_rows // self.views} images x {self.views} views ({self.num_rows} rows)"


def split_name(annotation_file: Path) -> str:
    """``instances_val2017.json`` -> ``val2017``; ``train.json`` -> ``train``."""
    name = annotation_file.stem.removeprefix("instances_")
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "split"


def pending_positions(done: np.ndarray, block: int, *, retry_skipped: bool) -> np.ndarray:
    """Positions of every image in a block that still has to be written: a block with an
    image not written yet (``done == 0``), or, with ``retry_skipped``, a skipped one.
    Blocks are the unit of writing, so a pending block is recomputed whole."""
    todo = (done == 0) | ((done == SKIPPED) if retry_skipped else False)
    starts = np.unique(np.flatnonzero(todo) // block * block)
    positions = [np.arange(s, min(s + block, len(done))) for s in starts]
    return np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Detected:
    """One row's detector outputs (cropped to the image, on the CPU) and its ground truth, on
    their way to the writer thread, which makes them its :class:`ImageRecord`."""

    sample: Sample
    gt: GroundTruth


@dataclass(frozen=True)
class Skipped:
    """A row recorded as skipped (``--skip-bad``), with the reason."""

    reason: str


def _write_block(writer: BlockWriter, start: int, parts: dict[int, ImageRecord | Skipped], out: Path) -> None:
    """Write one finished block; ``parts`` maps each position to its record or skip reason."""
    positions = sorted(parts)
    records = [None if isinstance(parts[p], Skipped) else parts[p] for p in positions]
    skipped = {p: parts[p].reason for p in positions if isinstance(parts[p], Skipped)}
    try:
        writer.write(start, records, skipped)
    except OSError as exc:
        what = "disk full" if exc.errno == errno.ENOSPC else f"cannot write ({exc.strerror or exc})"
        raise MfcacheError(
            f"{what} while writing images {start}..{start + len(records) - 1} to {out}; "
            "finished blocks are kept: free space and run the same command again"
        ) from None
    except MfcacheError:
        raise
    except Exception as exc:  # a request to object storage failed
        if isinstance(out, CacheLocation) and not out.is_local:
            raise MfcacheError(
                f"cannot write images {start}..{start + len(records) - 1} to {out} "
                f"({describe_store_error(exc)}); finished blocks are kept: run the same "
                "command again"
            ) from None
        raise


class _BlockAssembler:
    """The writer thread's job: each image's cropped detector outputs (or its finished
    record, or its skip reason) become its :class:`ImageRecord` (fp16/int8 rows, targets),
    and a block is written as soon as all its images are in."""

    def __init__(self, writer: BlockWriter, block: int, num_rows: int, out: Path, record_options: dict):
        self.writer, self.block, self.num_rows, self.out = writer, block, num_rows, out
        self.record_options = record_options
        self.buffers: dict[int, dict[int, ImageRecord | Skipped]] = {}

    def record(self, part: Detected | ImageRecord | Skipped) -> ImageRecord | Skipped:
        """``part`` as stored: detector outputs become their record."""
        if isinstance(part, Detected):
            return image_record(part.sample, gt=part.gt, **self.record_options)
        return part

    def __call__(self, i: int, part: Detected | ImageRecord | Skipped) -> None:
        start = i - i % self.block
        self.buffers.setdefault(start, {})[i] = self.record(part)
        if len(self.buffers[start]) == min(self.block, self.num_rows - start):
            _write_block(self.writer, start, self.buffers.pop(start), self.out)


def records_on_writer_thread(device: torch.device) -> bool:
    """With the detector on an accelerator the writer thread builds each record while the
    next batch runs; on the CPU the detector has every core, and a second busy thread slows
    its forward pass more than building the record in line costs (``benchmarks/``)."""
    return device.type != "cpu"


def own_blocks(pending: np.ndarray, block: int, world: World) -> np.ndarray:
    """The pending positions this rank writes: whole blocks, block ``b`` -> rank ``b % world``,
    so no two ranks ever write one chunk (regular arrays are chunked by block, ragged ones
    start every image on a chunk boundary)."""
    return pending[(pending // block) % world.size == world.rank]


def extract(
    *,
    detector: str,
    images: Path,
    annotations: Path,
    out: Path,
    split: str | None = None,
    config: ExtractConfig = ExtractConfig(),
    skip_bad: bool = False,
    ignore_free_space: bool = False,
    progress: bool = True,
) -> ExtractSummary:
    """Cache detector ``detector`` (a spec) on one COCO split; returns what was done.

    With ``skip_bad``, images that cannot be read are recorded as skipped (``index/done ==
    2``, reason in the split's ``skipped`` attrs) instead of stopping the run; without it,
    the first one stops the run with an error, after every finished block is stored, and
    images skipped by an earlier run are tried again. Annotations are checked when the file
    is loaded (:class:`CocoDataset`), before anything is written; the split stores the
    cleaned file, and the annotations left out (bad ones only with ``skip_bad``) are in its
    ``skipped_annotations`` attrs.

    Before the first batch it prints the storage plan (bytes per image and in all, free
    space) and refuses one the disk cannot hold, unless ``ignore_free_space``.

    Under ``torchrun --nproc_per_node N`` the ranks share the work: rank 0 creates the
    layout, then each rank runs the detector (``cuda:LOCAL_RANK`` on GPU) on its own whole
    blocks (:func:`own_blocks`); the cache equals a one-process run's array by array.
    One writer per cache: a second extract into ``out`` is refused at once, naming the
    process that holds it (:func:`mfcache.cache.lock.writer_lock`).
    Blocks are written by a background thread (:class:`BackgroundWriter`) while the
    detector runs on the next batches.

    SIGINT, SIGTERM or SIGUSR1, to this process or its whole process group (loader workers
    included), stop it after the batch in progress: the finished blocks are written, and
    :class:`mfcache.stopping.Interrupted` is raised (on every rank under torchrun); the same
    call again resumes."""
    out = locate(out)  # a folder, or a prefix in object storage (mfcache.cache.location)
    if out.is_local:
        check_folder(
            out.path, "`extract.out` (the cache folder)"
        )  # a file or a read-only place: before anything is made
    device = resolve_device(config.device)
    world, created = init_world(device)
    try:
        with writer_lock(out, world):  # one writer per cache, held to the end (rank 0 for the job)
            return _extract(
                detector=detector,
                images=images,
                annotations=annotations,
                out=out,
                split=split,
                config=config,
                skip_bad=skip_bad,
                ignore_free_space=ignore_free_space,
                progress=progress and world.is_main,
                world=world,
                device=world.device(device),
            )
    finally:
        close_world(created)


@dataclass
class _Job:
    """What one extract run stores, decided before anything is written."""

    dataset: CocoDataset
    split: str
    model: Detector
    topk: int  # detections per image: at most what the detector has
    levels: list[int]  # detector levels stored in memory, finest first
    meta: dict  # the split's attrs: annotation hash, label -> category map, ...
    c1: str  # the C1 policy (store | recompute | none: --c1 auto resolved, as fingerprinted)
    amp: str = "off"  # mixed precision of the detector's forward pass
    label_map: LabelMap | str | None = None  # extract.label_map of the fingerprint (mfcache.data.labels)
    warning: str | None = None  # dataset categories no detector label maps to
    views: int = 1  # rows per image, image-major (mfcache.data.views)
    view_crop: float = 0.0  # probability a view >= 1 is cropped (mfcache.data.views.view_crop)

    @property
    def agnostic(self) -> bool:
        return self.meta["class_agnostic"]


def _extract(
    *,
    detector: str,
    images: Path,
    annotations: Path,
    out: Path,
    split: str | None,
    config: ExtractConfig,
    skip_bad: bool,
    ignore_free_space: bool,
    progress: bool,
    world: World,
    device: torch.device,
) -> ExtractSummary:
    out = locate(out)
    # under torchrun every step of the setup ends on all ranks together: a failure on any rank
    # is the same one-line error on all of them, none is left waiting (mfcache.distributed.together)
    with together(world):
        job = _prepare(
            detector=detector,
            images=images,
            annotations=annotations,
            out=out,
            split=split,
            config=config,
            skip_bad=skip_bad,
            world=world,
            device=device,
        )
    group, plan = _create_split(job, out, config, world)
    if job.warning and world.is_main:  # before the long part: the user may stop and fix the mapping
        console.print(f"[bold yellow]warning:[/bold yellow] {job.warning}", highlight=False, soft_wrap=True)
    with together(world):
        writer = BlockWriter(group)
        block = int(group.attrs["block_size"])  # the split's own, whatever this run asked for
        todo = pending_positions(writer.index["index/done"], block, retry_skipped=not skip_bad)
        if world.is_main:
            _check_space(job, plan, todo, out, config, ignore=ignore_free_space, say=progress)
            if job.c1 == "recompute" and not out.has_node(STEM_ARRAY):  # after the plan is accepted
                export_detector_stem(job.model, out.open_group("r+"))
        pending = _own_pending(writer, todo, job.split, out, block, world=world)
    assemble = _BlockAssembler(
        writer,
        block,
        plan.num_rows,
        out,
        {"target_size": config.target_size, "dtype": config.dtype, "levels": job.levels},
    )
    stopped = _run_detector(
        job,
        plan,
        _loader(job, pending, block, config),
        assemble,
        total=len(pending),
        skip_bad=skip_bad,
        progress=progress,
        world=world,
        device=device,
    )
    stopped = _agree_on_stop(stopped, world, device)
    if stopped is not None:
        raise Interrupted(stopped, _cached_line(group, plan.num_rows))
    return _finish(job, group, writer, plan, written=len(pending), out=out, world=world, device=device)


def _agree_on_stop(signum: int | None, world: World, device: torch.device) -> int | None:
    """The stop signal this run ends on (None: it finished), the same on every rank: under
    torchrun each rank stops on its own signal after its batch, and any rank's stop is all of
    theirs (the others' blocks are written by then too)."""
    if not world.enabled:
        return signum
    highest = int(all_max(signum or 0, device))
    return highest or None


def _cached_line(group: zarr.Group, num_rows: int) -> str:
    """``with 6 of 12 images cached``: the split's finished rows as written now."""
    done = int((group["index/done"][:] != 0).sum())
    return f"with {done} of {num_rows} images cached"


def _prepare(
    *,
    detector: str,
    images: Path,
    annotations: Path,
    out: Path,
    split: str | None,
    config: ExtractConfig,
    skip_bad: bool,
    world: World,
    device: torch.device,
) -> _Job:
    """Check the options, load the annotations and the detector, and decide the stored top-k,
    levels, C1 policy and split attrs: a bad option or a label mismatch leaves no empty cache behind."""
    check_config(config)
    label_map = chosen_label_map(config.label_map, config.class_agnostic)  # a bad file: before the slow parts
    prompts = read_prompts(config.prompts) if config.prompts else None
    dataset = CocoDataset(annotations, images, skip_bad=skip_bad)
    if not len(dataset):
        raise MfcacheError(f"{annotations} lists no images")
    if world.enabled and skip_bad:  # skip reasons live in the split's attrs: one writer only
        raise MfcacheError("`extract.skip_bad` needs a single process: run extract without torchrun")
    split = split or split_name(Path(annotations))
    model = load_detector(detector, device=device, resize=None if config.resize == "auto" else config.resize)
    label_map = _apply_prompts(model, prompts, dataset.category_names, label_map, f"`extract.prompts` {config.prompts}")
    info = model.info
    num_classes = len(info.label_names)
    labels = resolve_labels(
        info.label_names,
        dataset.category_names,
        label_map,
        dataset.data["annotations"],
        source=f"`extract.label_map` {config.label_map}",
    )
    # class-agnostic: one detection per query (its best label), so top-k never lists a query twice
    topk = min(config.topk, info.num_queries * (num_classes if info.sigmoid and not labels.agnostic else 1))
    levels = sorted(set(config.levels)) if config.levels else list(range(len(info.strides)))
    if levels[0] < 0 or levels[-1] >= len(info.strides):
        raise MfcacheError(
            f"`extract.levels` {','.join(map(str, config.levels))}: the detector has levels "
            f"0..{len(info.strides) - 1} (strides {list(info.strides)})"
        )
    meta = {
        "annotations_sha256": dataset.sha256,
        "annotation_file": str(annotations),
        "images_dir": str(images),
        "label_to_category": labels.label_to_category,
        "class_agnostic": labels.agnostic,
        "category_names": {str(k): v for k, v in dataset.category_names.items()},
        "unmapped_categories": {str(k): v for k, v in labels.unmapped.items()},
        "skipped_annotations": {str(k): v for k, v in dataset.report.left_out.items()},
    }
    existing = stored_fingerprint(out)
    if config.views > 1 and config.c1 == "recompute":  # C1 is re-made from the plain image only
        raise MfcacheError(
            "`extract.views` > 1 needs `extract.c1` store, none or auto: recomputed C1 would miss the views' transforms"
        )
    if config.view_crop and config.views == 1:  # only views >= 1 are cropped
        raise MfcacheError("`extract.view_crop` needs `extract.views` > 1: view 0 is never cropped")
    c1 = resolve_c1(
        config.c1,
        existing=existing["extract"]["c1"] if existing else None,
        can_recompute=info.c1_channels > 0
        and model.c1_stem() is not None
        and Path(images).is_dir()
        and config.views == 1,
    )
    return _Job(
        dataset=dataset,
        split=split,
        model=model,
        topk=topk,
        levels=levels,
        meta=meta,
        c1=c1,
        amp=config.amp,
        label_map=label_map,
        warning=unmapped_warning(labels, dataset.category_names),
        views=config.views,
        view_crop=config.view_crop,
    )


def _apply_prompts(
    model: Detector,
    prompts: PromptFile | None,
    categories: dict[int, str],
    label_map: LabelMap | str | None,
    where: str,
) -> LabelMap | str | None:
    """Give an open-vocabulary detector its prompt (``prompts``, the ``--prompts`` file, or the
    category names) and return the label mode with the map the file implies; a detector with
    fixed classes refuses ``--prompts``."""
    if prompts is None and not model.open_vocabulary:
        return label_map
    phrases, implied = prompt_phrases(prompts, categories, where=where)
    model.set_prompts(phrases)
    return with_implied_map(label_map, implied)


def _create_split(job: _Job, out: Path, config: ExtractConfig, world: World) -> tuple[zarr.Group, SplitPlan]:
    """Open (or create) the cache and the split's layout. Under torchrun rank 0 does it alone and
    removes an interrupted run's partial writes, while the other ranks wait (for its outcome:
    a refused cache is the same error on every rank); they open the finished layout after it."""
    info = job.model.info
    with together(world):
        ids, orig_hw = rows_frames(
            [im.id for im in job.dataset.images],  # images x views, a crop's frame its own
            [(im.height, im.width) for im in job.dataset.images],
            job.views,
            job.view_crop,
        )
        plan = plan_split(
            ids,
            orig_hw,
            info,
            config.chunk_tokens,
            job.levels,
            input_hw=rows_input_hw(info.preprocess, ids, orig_hw, job.views) if job.views > 1 else None,
        )
        if world.is_main:  # rank 0 creates the root and the split's layout alone; nothing writes yet
            group = _open_layout(job, out, config, plan)
            remove_partial_writes(out, job.split)
    with together(world):
        if not world.is_main:
            group = _open_layout(job, out, config, plan)
    return group, plan


def _open_layout(job: _Job, out: Path, config: ExtractConfig, plan: SplitPlan) -> zarr.Group:
    """The split's group in cache ``out``, root and layout created if missing; a cache made
    with another fingerprint is refused (:func:`open_root`)."""
    info = job.model.info
    root = open_root(
        out,
        fingerprint(
            info,
            topk=job.topk,
            target_size=config.target_size,
            c1=job.c1,
            dtype=config.dtype,
            levels=job.levels,
            compress=config.compress,
            amp=config.amp,
            label_map=job.label_map,
            views=job.views,
            view_crop=job.view_crop,
        ),
    )
    return create_split(
        root,
        job.split,
        plan,
        meta=job.meta,
        annotations=job.dataset.stored,
        topk=job.topk,
        d_model=info.d_model,
        c1_channels=info.c1_channels if job.c1 == "store" else 0,
        target_size=config.target_size,
        block_size=config.block_size,
        dtype=config.dtype,
        compress=config.compress,
    )


def _check_space(
    job: _Job, plan: SplitPlan, todo: np.ndarray, out: Path, config: ExtractConfig, *, ignore: bool, say: bool
) -> None:
    """Print (with ``say``) the storage plan of what is left to write (images, bytes per image
    by array, total, free space under ``out``) and refuse, before the first batch, a plan the
    disk cannot hold, unless ``ignore``; the layout just created is a few kB of metadata."""
    info = job.model.info
    storage = storage_plan(
        plan,
        topk=job.topk,
        d_model=info.d_model,
        target_size=config.target_size,
        c1_channels=info.c1_channels if job.c1 == "store" else 0,
        dtype=config.dtype,
    )
    free = shutil.disk_usage(out.path).free if out.is_local else None  # object storage: no free space to check
    need = storage.total(todo)
    if say:
        space = f"{format_bytes(free)} free on {out}" if free is not None else f"writing to {out}"
        console.print(
            f"plan for split {job.split!r} ({c1_note(job.c1, config.c1, info.c1_channels)}): "
            f"{storage.line(todo, 'row' if job.views > 1 else 'image')}; {space}",
            highlight=False,
            soft_wrap=True,
        )
    if free is not None and need > free and not ignore:
        less = "`extract.dtype` int8, `extract.c1` recompute or none, `extract.levels`"
        if job.c1 != "store":
            less = "`extract.dtype` int8, `extract.levels`"
        raise MfcacheError(
            f"split {job.split!r} needs {format_bytes(need)} but {out} has {format_bytes(free)} free: free space, "
            f"store less ({less}), or pass `extract.ignore_free_space` to go on"
        )


def _own_pending(
    writer: BlockWriter, todo: np.ndarray, split: str, out: Path, block: int, *, world: World
) -> np.ndarray:
    """The positions of ``todo`` (every image still to write) that this rank writes: its whole blocks."""
    if world.enabled and (writer.index["index/done"] == SKIPPED).any():
        raise MfcacheError(
            f"split {split!r} of {out} has skipped images: retry them with a single process (without torchrun)"
        )
    return own_blocks(todo, block, world)


def detector_batches(pending: np.ndarray, block: int, batch_size: int, views: int = 1) -> list[list[int]]:
    """The detector batches over ``pending`` (row positions, whole blocks of ``block`` rows), as
    indices into ``pending``: each block's rows view by view (all its view-0 rows, then its
    view-1 rows, ...), cut into batches of ``batch_size`` from the first row of each view.

    A batch never straddles a block and starts at a block's first row of its view, so a resumed
    run batches (and pads) every row exactly as an uninterrupted run does: outputs are identical.
    Views never share a batch, so with ``batch_size`` dividing ``block // views`` the view-0 rows
    of a ``views`` cache are batched exactly as the rows of the plain cache (same ``block`` and
    ``batch_size``) and their outputs equal it bit for bit: the detector's floating point may
    differ in the last bits between batch compositions on some CPUs' kernels."""
    batches = []
    for b0 in range(0, len(pending), block):
        rows = np.arange(b0, min(b0 + block, len(pending)))
        for v in range(views):
            same_view = rows[pending[rows] % views == v].tolist()
            batches += [same_view[j : j + batch_size] for j in range(0, len(same_view), batch_size)]
    return batches


def _loader(job: _Job, pending: np.ndarray, block: int, config: ExtractConfig) -> DataLoader:
    """Decoded images of ``pending`` in detector batches."""
    return DataLoader(
        ImageSource(job.dataset, pending, job.model.info.preprocess, job.views, job.view_crop),
        batch_sampler=detector_batches(pending, block, config.batch_size, job.views),
        num_workers=config.num_workers,
        collate_fn=list,
        worker_init_fn=ignore_stop_signals,
        persistent_workers=False,
        prefetch_factor=4 if config.num_workers else None,
    )


def _run_detector(
    job: _Job,
    plan: SplitPlan,
    loader: DataLoader,
    assemble: _BlockAssembler,
    *,
    total: int,
    skip_bad: bool,
    progress: bool,
    world: World,
    device: torch.device,
) -> int | None:
    """The detector over every batch of ``loader``; each image's outputs (or its skip reason)
    go to the writer thread, which writes a block once all its images are in. Returns the stop
    signal that ended it after a batch, every finished block written (None: all done); a
    block left unfinished is not written, so it reads as pending and the next run redoes it."""
    model, info = job.model, job.model.info
    where = f"{info.family} on {device.type}" + (f", rank 0 of {world.size}" if world.enabled else "")
    with (
        StopSignals() as stop,
        worker_batches(loader) as batches,
        progress_bar(progress) as bar,
        BackgroundWriter(assemble, depth=WRITE_QUEUE * assemble.block) as background,
    ):
        task = bar.add_task(f"extract {job.split}", total=total, status=where)
        for items in batches:
            good = [item for item in items if isinstance(item, DecodedRow)]
            for item in items:
                if isinstance(item, UnreadableRow) and not skip_bad:
                    raise MfcacheError(f"{item.reason} (pass `extract.skip_bad` to record it as skipped and go on)")
            if good:
                out_batch = run_detector(model, [item.input for item in good], device=device, amp=job.amp)
                top = select_topk(out_batch, job.topk, sigmoid=info.sigmoid, agnostic=job.agnostic)
            for b, item in enumerate(good):
                i = item.position
                sample = image_sample(
                    out_batch,
                    top,
                    b,
                    level_hw=plan.level_hw[i],
                    input_hw=plan.input_hw[i],
                    image_id=plan.image_id[i],
                    orig_hw=plan.orig_hw[i],
                )
                part = Detected(sample.cpu(), item.gt)
                background.submit(i, part if records_on_writer_thread(device) else assemble.record(part))
            for item in items:
                if isinstance(item, UnreadableRow):
                    background.submit(item.position, Skipped(item.reason))
            bar.advance(task, len(items))
            if stop.signum is not None:
                break
        else:  # the last batch is done: a signal now stops nothing (its blocks are still written)
            stop.signum = None
    if stop.signum is not None:
        return stop.signum
    if assemble.buffers:  # pending holds whole blocks, so every block fills up
        raise MfcacheError(f"internal error: unfinished blocks {sorted(assemble.buffers)}")
    return None


def _finish(
    job: _Job,
    group: zarr.Group,
    writer: BlockWriter,
    plan: SplitPlan,
    *,
    written: int,
    out: Path,
    world: World,
    device: torch.device,
) -> ExtractSummary:
    """Wait for every rank's blocks, then sum up; a finished split gets its match stats."""
    if world.enabled:  # every rank's blocks are written once all ranks get here
        written = int(all_sum(written, device))
        world.barrier()
    done = group["index/done"][:] if world.enabled else writer.index["index/done"]
    complete = world.is_main and not (done == 0).any()
    match = record_match_stats(group, recompute=written > 0, views=job.views) if complete else None
    return ExtractSummary(
        split=job.split,
        num_rows=plan.num_rows,
        written=written,
        cache=out.path if out.is_local else out,
        c1=job.c1,
        views=job.views,
        skipped=int((done == SKIPPED).sum()),
        match=match,
        annotations=job.dataset.report.summary(),
        skipped_annotations=len(job.dataset.report.left_out),
    )


def record_match_stats(group, *, recompute: bool, views: int = 1) -> MatchStats:
    """The finished split's :class:`~mfcache.cache.stats.MatchStats` (how many GT instances a
    query trains on, the box recall at 0.5), stored in its attrs for `inspect` and `train`;
    kept as stored when this run wrote nothing new."""
    stats = None if recompute else stored_stats(group)
    if stats is None:
        stats = group_stats(group, views=views)
        group.attrs[STATS_ATTR] = stats.to_dict()
    return stats
