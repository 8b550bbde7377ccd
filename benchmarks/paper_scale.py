"""The paper's setting end to end at its real size, through mfcache's own stages: full-size
H-DETR R50 (two-stage, box refine, mixed selection, 300 queries) and DINO-4scale R50 (900
queries), random weights (none can be downloaded; the compute is a trained model's), at the
paper's 800x1333 resize, over synthetic COCO-sized images (480x640 -> 800x1067 inputs).

    python benchmarks/paper_scale.py --out ps-out --device cuda       # a GPU
    nice python benchmarks/paper_scale.py --out ps-out --quick         # a CPU, under 15 minutes

Writes ``OUT/paper_scale.json`` (after every stage) and ``OUT/paper_scale.md`` and prints the
tables. Stages:

1. **extract** (``mfcache.stages.extract``), per detector and storage option (:data:`STORAGE`;
   ``--storage NAME=key=value,...`` adds one, e.g. a new ``--dtype``): seconds per image end to
   end and after the model load, bytes per image measured on the written cache (``du`` of the
   chunk files that grow with the images; the fixed rest, e.g. metadata or an exported C1
   stem, apart), peak memory. A storage option the library refuses is recorded with its error.
2. **train** (``mfcache.stages.train``) ``paper_final`` and ``box_baseline`` at batch 8 on the
   top-100 queries of each trained detector's float16 cache: s/step after warm-up steps, peak
   memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of this process).
3. **eval** (``mfcache.stages.evaluate``) of each trained head on the same split: s/image (its
   AP is meaningless: random weights).
4. **projection** to COCO train2017 (118,287 images) from the measured per-image figures: TB
   per storage option, extraction hours, the paper's head schedule (88,500 steps of 8), and
   eval hours for val2017 (5,000 images), all on this device.

``--quick`` keeps the full size (detectors, 800x1333, batch 8) and shrinks only the counts:
H-DETR on 8 images (1 per further storage option), DINO on 1 image with float16 only and
untrained, 1 warm-up + 1 timed step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from cache_io import COCO_TRAIN2017_IMAGES
from common import (
    COCO_HW,
    PAPER_EDGES,
    PeakMemory,
    cache_bytes,
    cpu_name,
    fmt,
    positives_threshold,
    subset_annotations,
    write_coco_sized_dataset,
    write_native_checkpoint,
    write_report,
)

PAPER_STEPS, PAPER_BATCH = 88_500, 8
COCO_VAL2017_IMAGES = 5_000
HEADS = ("paper_final", "box_baseline")
POSITIVES = 20  # training queries per image aimed at (common.positives_threshold)
# Storage options, as ExtractConfig fields. C1 is named explicitly: the default policy may change.
STORAGE = {
    "float16": {"dtype": "float16", "c1": "store"},
    "int8": {"dtype": "int8", "c1": "store"},
    "float16+compress": {"dtype": "float16", "c1": "store", "compress": True},
    "float16 c1=none": {"dtype": "float16", "c1": "none"},
    "int8 c1=none": {"dtype": "int8", "c1": "none"},
    "float16 c1=recompute": {"dtype": "float16", "c1": "recompute"},
}
MAIN = "float16"  # the option every detector runs on all its images; heads train on its cache
DETECTORS = {"hdetr_r50": ("hdetr", {}), "dino_4scale_r50": ("dino", {})}
TINY = {
    "backbone": "resnet18",
    "d_model": 64,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 96,
    "enc_n_points": 2,
    "dec_n_points": 3,
}
TINY_DETECTORS = {
    "hdetr_r50": ("hdetr", {**TINY, "num_queries": 30, "num_queries_one2many": 30}),
    "dino_4scale_r50": ("dino", {**TINY, "num_queries": 30}),
}


@dataclass(frozen=True)
class Plan:
    """Counts of one run; sizes stay the paper's except with the hidden ``--tiny`` (tests)."""

    images: int  # images of a trained detector's MAIN extraction (training batch: min(8, images))
    option_images: int  # images of each further storage option
    all_options: tuple[str, ...]  # detectors measured with every storage option (others: MAIN only)
    trained: tuple[str, ...]  # detectors whose MAIN cache trains and evaluates the heads
    warmup_steps: int
    steps: int
    hw: tuple[int, int] = COCO_HW
    edges: tuple[int, int] = PAPER_EDGES
    tiny: bool = False

    @classmethod
    def make(cls, quick: bool, tiny: bool) -> Plan:
        if tiny:  # the test's plan: the code paths of --quick in seconds
            return cls(
                images=2,
                option_images=1,
                all_options=("hdetr_r50",),
                trained=("hdetr_r50",),
                warmup_steps=1,
                steps=1,
                hw=(48, 64),
                edges=(64, 107),
                tiny=True,
            )
        if quick:
            return cls(
                images=8, option_images=1, all_options=("hdetr_r50",), trained=("hdetr_r50",), warmup_steps=1, steps=1
            )
        return cls(
            images=32, option_images=8, all_options=tuple(DETECTORS), trained=tuple(DETECTORS), warmup_steps=3, steps=20
        )


@dataclass
class Run:
    device: torch.device
    plan: Plan
    out: Path
    work: Path
    storage: dict
    results: dict
    eval_batch: int
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def log(self, message: str) -> None:
        print(f"[{datetime.datetime.now():%H:%M:%S} +{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def workers(self, stage: str) -> int:
        """Extraction: image-decoding processes; training: reader processes (none on a CPU, so
        that its peak RSS counts the reader)."""
        if self.plan.tiny or (stage == "train" and self.device.type == "cpu"):
            return 0
        return min(4, max(1, (os.cpu_count() or 1) // 4))


def error_row(exc: Exception) -> dict:
    traceback.print_exc()
    return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- 1. extract
def stage_extract(run: Run, data: Path, annotations: Path) -> list[dict]:
    """Every detector x storage option; returns the rows (private ``_cache``: MAIN's cache)."""
    from mfcache.detectors import load_detector

    plan, rows = run.plan, []
    subset = subset_annotations(annotations, plan.option_images, data / "annotations" / "subset.json")
    detectors = TINY_DETECTORS if plan.tiny else DETECTORS
    for name, (family, options) in detectors.items():
        spec = write_native_checkpoint(
            run.work / name, family, shortest_edge=plan.edges[0], longest_edge=plan.edges[1], options=options
        )
        start = time.perf_counter()
        load_detector(spec, device=run.device)  # the model load alone, subtracted from each extraction
        run.sync()
        load_s = time.perf_counter() - start
        for storage, option in run.storage.items():
            if storage != MAIN and name not in plan.all_options:
                continue
            images = plan.images if storage == MAIN and name in plan.trained else plan.option_images
            run.log(f"extract {name} {storage} ({images} images)")
            row = {"detector": name, "storage": storage, "options": option, "images": images, "model_load_s": load_s}
            try:
                row.update(
                    extract_once(
                        run,
                        spec,
                        data,
                        annotations if images == plan.images else subset,
                        images,
                        option,
                        run.work / f"cache-{name}-{len(rows)}",
                        keep=storage == MAIN,
                    )
                )
            except Exception as exc:  # e.g. a C1 policy this detector does not support: the rest still runs
                row.update(error_row(exc))
            rows.append(row)
            run.log(
                f"  {fmt(row.get('s_per_image'))} s/image, {fmt(row.get('bytes_per_image', 0) / 2**20)} MiB/image"
                if "error" not in row
                else f"  {row['error']}"
            )
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def extract_once(
    run: Run, spec: str, data: Path, annotations: Path, images: int, option: dict, cache: Path, keep: bool
) -> dict:
    """One ``extract`` into ``cache`` (block size = the images, so no block is part padding, as
    almost none is in a 118k-image split); its cost and the bytes the cache takes on disk."""
    from mfcache.cache.reader import Cache
    from mfcache.config import ExtractConfig, check_config
    from mfcache.stages.extract import extract

    config = ExtractConfig(
        device=str(run.device), num_workers=run.workers("extract"), block_size=min(16, images), **option
    )
    check_config(config)
    with PeakMemory(run.device) as peak:
        start = time.perf_counter()
        extract(
            detector=spec,
            images=data / "train",
            annotations=annotations,
            out=cache,
            split="train",
            config=config,
            progress=False,
        )
        run.sync()
        seconds = time.perf_counter() - start
    size = cache_bytes(cache)
    if Cache(cache).split("train").num_rows != images:  # every per-image figure divides by it
        raise RuntimeError(f"{cache} holds {Cache(cache).split('train').num_rows} images, not {images}")
    row = {
        "extract_s": seconds,
        "s_per_image": seconds / images,
        "bytes_per_image": size["per_image_arrays"] / images,
        "fixed_bytes": size["fixed"],
        "cache_bytes": size["total"],
        "peak_GiB": peak.gib,
        "peak_kind": peak.kind,
    }
    if keep:
        row["_cache"] = cache
    else:
        shutil.rmtree(cache)
    return row


# ----------------------------------------------------------------------------- 2. train, 3. eval
def stage_train_eval(run: Run, extraction: list[dict]) -> list[dict]:
    """Each head on each trained detector's MAIN cache: timed training, then evaluation."""
    from mfcache.cache.reader import Cache

    rows = []
    for source in extraction:
        if source["storage"] != MAIN or source["detector"] not in run.plan.trained or "_cache" not in source:
            continue
        cache = source["_cache"]
        min_iou, positives = positives_threshold(Cache(cache), POSITIVES)
        for head in HEADS:
            run.log(f"train + eval {head} on {source['detector']}")
            row = {"detector": source["detector"], "head": head, "min_iou": min_iou, "positives_per_image": positives}
            try:
                row.update(train_and_eval(run, cache, head, min_iou, source["images"]))
            except Exception as exc:
                row.update(error_row(exc))
            rows.append(row)
            run.log(
                f"  {fmt(row.get('s_per_step'))} s/step, eval {fmt(row.get('eval_s_per_image'))} s/image"
                if "error" not in row
                else f"  {row['error']}"
            )
    return rows


def train_and_eval(run: Run, cache: Path, head: str, min_iou: float, images: int) -> dict:
    from mfcache.config import resolve_run_config
    from mfcache.stages.evaluate import evaluate
    from mfcache.stages.train import train

    plan = run.plan
    batch = min(PAPER_BATCH, images)
    run_dir = cache.parent / f"run-{cache.name}-{head}"

    def config(steps: int):
        return resolve_run_config(
            head,
            [
                f"train.steps={steps}",
                f"train.min_iou={min_iou}",
                f"train.batch_size={batch}",
                f"train.device={run.device}",
                f"train.num_workers={run.workers('train')}",
                "train.checkpoint_every=1000000",
                "train.log_every=1000000",
            ],
        )

    train(cache_path=cache, run_dir=run_dir, progress=False, config=config(plan.warmup_steps))
    with PeakMemory(run.device) as peak:
        result = train(
            cache_path=cache,
            run_dir=run_dir,
            progress=False,
            resume=True,
            config=config(plan.warmup_steps + plan.steps),
        )
    start = time.perf_counter()
    evaluate(
        cache_path=cache,
        run_dir=run_dir,
        split="train",
        device=str(run.device),
        progress=False,
        overrides=[f"eval.batch_size={run.eval_batch}"],
    )
    run.sync()
    eval_s = time.perf_counter() - start
    return {
        "batch": batch,
        "steps": plan.steps,
        "warmup_steps": plan.warmup_steps,
        "train_s": result["seconds"],
        "s_per_step": result["seconds"] / plan.steps,
        "images_per_s": plan.steps * batch / result["seconds"],
        "peak_GiB": peak.gib,
        "peak_kind": peak.kind,
        "eval_images": images,
        "eval_batch": run.eval_batch,
        "eval_s": eval_s,
        "eval_s_per_image": eval_s / images,
    }


# ----------------------------------------------------------------------------- 4. projection
def projection(extraction: list[dict], training: list[dict]) -> dict:
    """COCO figures on this device from the measured per-image ones."""
    n = COCO_TRAIN2017_IMAGES
    storage = [
        {
            "detector": r["detector"],
            "storage": r["storage"],
            "bytes_per_image": r["bytes_per_image"],
            "train2017_TB": r["bytes_per_image"] * n / 1e12,
            "extract_hours": max(r["extract_s"] - r["model_load_s"], 0) / r["images"] * n / 3600,
        }
        for r in extraction
        if "bytes_per_image" in r
    ]
    heads = [
        {
            "detector": r["detector"],
            "head": r["head"],
            "paper_schedule_hours": PAPER_STEPS * r["s_per_step"] * PAPER_BATCH / r["batch"] / 3600,
            "val2017_eval_hours": COCO_VAL2017_IMAGES * r["eval_s_per_image"] / 3600,
        }
        for r in training
        if "s_per_step" in r
    ]
    return {
        "train2017_images": n,
        "schedule": f"{PAPER_STEPS:,} steps x batch {PAPER_BATCH}",
        "storage": storage,
        "heads": heads,
    }


def bytes_per_image(extraction: list[dict]) -> dict:
    """``{detector: {storage option: bytes per image}}`` (what run_all.py reports)."""
    out: dict = {}
    for r in extraction:
        if "bytes_per_image" in r:
            out.setdefault(r["detector"], {})[r["storage"]] = r["bytes_per_image"]
    return out


# ----------------------------------------------------------------------------- tables
def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# paper scale ({meta['device_name']}, {meta['threads']} threads"
        f"{', --quick' if meta['quick'] else ''}{', TINY sizes' if meta['plan']['tiny'] else ''})\n",
        f"{meta['started']}, {meta.get('elapsed_s', 0):.0f} s; images {meta['image_hw'][0]}x{meta['image_hw'][1]} "
        f"-> resize {meta['plan']['edges'][0]}/{meta['plan']['edges'][1]}; load average at start "
        f"{meta['load_average_at_start']}, at end {meta.get('load_average_at_end')}\n",
    ]
    n = COCO_TRAIN2017_IMAGES
    if "extract" in results:
        lines += [
            "| detector | storage | images | s/image (end to end) | s/image (after load) | MiB/image | "
            "train2017 TB | train2017 extract h | peak GiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["extract"]:
            if "error" in r:
                lines.append(f"| {r['detector']} | {r['storage']} | {r['images']} | {r['error']} | | | | | |")
                continue
            after = max(r["extract_s"] - r["model_load_s"], 0) / r["images"]
            lines.append(
                f"| {r['detector']} | {r['storage']} | {r['images']} | {r['s_per_image']:.2f} | {after:.2f} | "
                f"{r['bytes_per_image'] / 2**20:.2f} | {r['bytes_per_image'] * n / 1e12:.2f} | "
                f"{after * n / 3600:.0f} | {fmt(r['peak_GiB'])} |"
            )
        lines.append("")
    if "train_eval" in results:
        lines += [
            "| detector | head | batch | s/step | images/s | peak GiB | train queries/image | "
            "paper schedule h | eval s/image | val2017 eval h |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["train_eval"]:
            if "error" in r:
                lines.append(f"| {r['detector']} | {r['head']} | {r['error']} | | | | | | | |")
                continue
            hours = PAPER_STEPS * r["s_per_step"] * PAPER_BATCH / r["batch"] / 3600
            lines.append(
                f"| {r['detector']} | {r['head']} | {r['batch']} | {r['s_per_step']:.2f} | "
                f"{r['images_per_s']:.2f} | {fmt(r['peak_GiB'])} | {r['positives_per_image']:.1f} | "
                f"{hours:.0f} | {r['eval_s_per_image']:.3f} | "
                f"{COCO_VAL2017_IMAGES * r['eval_s_per_image'] / 3600:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def save(run: Run) -> str:
    run.results["meta"]["elapsed_s"] = time.perf_counter() - run.started
    return write_report(run.out, "paper_scale", run.results, markdown(run.results))


# ----------------------------------------------------------------------------- main
def parse_storage(values: list[str]) -> dict:
    """``NAME=key=value,key=value`` -> ``{NAME: {key: value}}`` (true/false and integers typed)."""
    out = {}
    for value in values:
        name, _, rest = value.partition("=")
        option = {}
        for part in filter(None, rest.split(",")):
            key, _, v = part.partition("=")
            option[key] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
        out[name] = option
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for paper_scale.json and paper_scale.md")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="fewer images and steps (sizes unchanged)")
    parser.add_argument(
        "--storage",
        nargs="*",
        default=[],
        metavar="NAME=key=value,...",
        help="a further storage option, as extract config fields (e.g. 'compact=dtype=int8,compress=true')",
    )
    parser.add_argument(
        "--eval-batch",
        type=int,
        default=None,
        help="eval.batch_size (default: 8, the library's, on a GPU; 2 on a CPU: paper_final at 8 "
        "runs its box encoder on 800 RoIs at once, over 20 GB)",
    )
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny detectors and images
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plan = Plan.make(args.quick, args.tiny)
    work = Path(tempfile.mkdtemp(prefix="paperscale-", dir=args.work))
    storage = {**STORAGE, **parse_storage(args.storage)}
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "quick": args.quick,
        "started": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        "plan": dataclasses.asdict(plan),
        "image_hw": plan.hw,
        "load_average_at_start": os.getloadavg(),
        "positives_aimed_at": POSITIVES,
    }
    eval_batch = args.eval_batch or (8 if device.type == "cuda" else 2)
    meta["eval_batch"] = eval_batch
    run = Run(
        device=device,
        plan=plan,
        out=args.out,
        work=work,
        storage=storage,
        results={"meta": meta},
        eval_batch=eval_batch,
    )
    try:
        run.log(f"writing {plan.images} synthetic {plan.hw[0]}x{plan.hw[1]} images")
        annotations = write_coco_sized_dataset(work / "data", images=plan.images, hw=plan.hw)
        extraction = stage_extract(run, work / "data", annotations)
        run.results.update(extract=extraction, bytes_per_image=bytes_per_image(extraction))
        save(run)
        training = stage_train_eval(run, extraction)
        run.results.update(train_eval=training, projection=projection(extraction, training))
        meta.update(load_average_at_end=os.getloadavg(), finished=True)
    finally:
        table = save(run)
        shutil.rmtree(work, ignore_errors=True)
    print(table)


if __name__ == "__main__":
    main()
