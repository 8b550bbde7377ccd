"""Cache I/O benchmarks used by ``run_all.py``: reader throughput against the disk,
extraction overhead over the bare detector, and storage per image (measured and projected)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

COCO_TRAIN2017_IMAGES = 118_287


def evict(root: Path) -> None:
    """Drop every file under ``root`` from the page cache (after flushing dirty pages)."""
    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def sequential_read(root: Path) -> int:
    """Read every file under ``root`` front to back in 1 MiB pieces; returns the bytes read."""
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def synthetic_cache(
    out: Path,
    *,
    images: int,
    input_hw: tuple[int, int],
    d_model: int = 256,
    c1_channels: int = 256,
    dtype: str = "float16",
    topk: int = 100,
    positives: int | None = None,
) -> Path:
    """A cache with the layout of a Deformable DETR R50 extraction (4 levels, strides 8-64,
    d=256, C1 256 channels; H-DETR and DINO-4scale R50 have the same) at ``input_hw``, filled
    with random values (no detector run). ``positives``: queries per image matched to a GT
    instance of their own at IoU 1 (the first ones; default all ``topk``), the rest to none, so
    that training trains on that many per image; the split records these match statistics."""
    from mfcache.cache.records import ImageRecord
    from mfcache.cache.schema import fingerprint, plan_split, quantize
    from mfcache.cache.stats import STATS_ATTR, MatchStats
    from mfcache.cache.writer import BlockWriter, create_split, open_root
    from mfcache.detectors.base import DetectorInfo, Preprocess

    h, w = input_hw
    info = DetectorInfo(
        spec="synthetic",
        family="deformable_detr",
        d_model=d_model,
        num_queries=300,
        label_names=("thing",),
        strides=(8, 16, 32, 64),
        c1_channels=c1_channels,
        sigmoid=True,
        weights_sha256="0" * 64,
        preprocess=Preprocess(shortest_edge=min(h, w), longest_edge=max(h, w)),
    )
    root = open_root(out, fingerprint(info, topk=topk, target_size=64, c1="store", dtype=dtype))
    plan = plan_split(np.arange(images), [(h, w)] * images, info)
    group = create_split(
        root,
        "train",
        plan,
        meta={
            "annotations_sha256": "",
            "annotation_file": "",
            "images_dir": "",
            "label_to_category": [1],
            "category_names": {"1": "thing"},
        },
        annotations=b"{}",
        topk=topk,
        d_model=d_model,
        c1_channels=c1_channels,
        target_size=64,
        block_size=8,
        dtype=dtype,
    )
    positives = topk if positives is None else min(positives, topk)
    group.attrs[STATS_ATTR] = MatchStats(
        images=images,
        gt_instances=images * positives,
        min_iou=0.5,
        matched=images * positives,
        recalled=images * positives,
        best_iou=1.0,
    ).to_dict()
    matched = np.arange(topk) < positives
    writer = BlockWriter(group)
    rng = np.random.default_rng(0)
    tokens = int(plan.level_hw[0].prod(-1).sum())
    pixels = int((-(-plan.input_hw[0] // 4)).prod())
    store = np.float16 if dtype == "float16" else np.float32

    def record() -> ImageRecord:
        feats = {
            "queries": rng.standard_normal((topk, d_model), dtype=np.float32),
            "memory": rng.standard_normal((tokens, d_model), dtype=np.float32),
            "c1": rng.standard_normal((pixels, c1_channels), dtype=np.float32),
        }
        scales = None
        if dtype == "int8":
            q = {k: quantize(v) for k, v in feats.items()}
            feats, scales = {k: a for k, (a, _) in q.items()}, {f"scales/{k}": s for k, (_, s) in q.items()}
        else:
            feats = {k: v.astype(store) for k, v in feats.items()}
        boxes = np.sort(rng.uniform(0, min(h, w), (topk, 4)).astype(np.float32).reshape(topk, 2, 2), 1).reshape(topk, 4)
        return ImageRecord(
            queries=feats["queries"],
            boxes=boxes,
            scores=rng.random(topk, dtype=np.float32),
            labels=np.zeros(topk, np.int32),
            query_index=np.arange(topk, dtype=np.int32),
            gt_id=np.where(matched, np.arange(topk), -1).astype(np.int64),
            gt_iou=matched.astype(np.float32),
            target_masks=rng.integers(0, 255, (topk, 512), dtype=np.uint8),
            memory=feats["memory"],
            c1=feats["c1"],
            scales=scales,
        )

    for start in range(0, images, 8):
        writer.write(start, [record() for _ in range(min(8, images - start))])
    return out


def bench_reader(quick: bool) -> dict:
    """Training reader (CacheDataset + DataLoader, train.num_workers, Batch.collate, levels 0 + C1
    + targets as the box baseline reads) vs a plain sequential read of the same files, both
    from a cold page cache; alternated, median of repeats.

    The ratio compares throughputs: the reader's MB/s from its first batch on (training
    reads batches for hours; the workers' one-off start is reported apart as
    ``first_batch_s``, and ``cold_ratio_to_disk`` counts it in). The reader checks every
    part it serves against its CRC-32 (``CacheSplit.checksums``); the same reader with the
    check off runs alongside (``unchecked_*``), and ``crc_MBps`` is the cache's CRC-32 alone on
    this machine (``crc_implementation``: isal or zlib), so the check's cost is stated three ways."""
    from torch.utils.data import DataLoader

    from mfcache.cache.reader import CacheDataset, CacheSplit
    from mfcache.cache.sample import Batch
    from mfcache.cache.schema import CRC32_IMPLEMENTATION
    from mfcache.config import TrainConfig

    images, repeats, batch = (48, 3, 8) if quick else (128, 5, 8)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        root = synthetic_cache(Path(tmp) / "cache", images=images, input_hw=(480, 640))
        split_dir = root / "train"
        workers = TrainConfig().num_workers

        def reader(concurrent: bool, num_workers: int = workers, checksums: bool = True):
            def run() -> tuple[float, float]:
                """Seconds to the first batch, seconds for all."""
                start = time.perf_counter()
                CacheSplit.concurrent = concurrent  # forked workers inherit these
                CacheSplit.checksums = checksums
                dataset = CacheDataset(root, "train", levels=None, c1=True, targets=True)
                first = None
                for _ in DataLoader(dataset, batch_size=batch, collate_fn=Batch.collate, num_workers=num_workers):
                    first = first or time.perf_counter() - start
                return first, time.perf_counter() - start

            return run

        def disk() -> tuple[float, float]:
            start = time.perf_counter()
            sequential_read(split_dir)
            return 0.0, time.perf_counter() - start

        sides = {
            "disk": disk,
            "reader": reader(True),
            "reader_unchecked": reader(True, checksums=False),
            "reader_serial": reader(False),
            "reader_in_process": reader(True, num_workers=0),
            "reader_in_process_unchecked": reader(True, num_workers=0, checksums=False),
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        for _ in range(repeats):
            for name, fn in sides.items():
                evict(root)
                times[name].append(fn())
        CacheSplit.concurrent, CacheSplit.checksums = True, True
        stored = sum(p.stat().st_size for p in split_dir.rglob("*") if p.is_file())
        crc_rate = _crc_rate()
    mb = stored / 1e6
    steady = (images - batch) / images  # the share of the bytes that come after the first batch
    total = {k: statistics.median(t for _, t in v) for k, v in times.items()}
    rate = {k: statistics.median(mb * steady / (t - f) for f, t in v) for k, v in times.items() if k != "disk"}
    rate["disk"] = mb / total["disk"]
    return {
        "images": images,
        "input_hw": [480, 640],
        "bytes": stored,
        "workers": workers,
        "disk_MBps": rate["disk"],
        "reader_MBps": rate["reader"],
        "reader_serial_MBps": rate["reader_serial"],
        "ratio_to_disk": rate["reader"] / rate["disk"],
        "first_batch_s": statistics.median(f for f, _ in times["reader"]),
        "cold_ratio_to_disk": total["disk"] / total["reader"],
        "in_process_MBps": mb / total["reader_in_process"],
        "in_process_ratio_to_disk": total["disk"] / total["reader_in_process"],
        "concurrent_speedup": rate["reader"] / rate["reader_serial"],
        "unchecked_MBps": rate["reader_unchecked"],
        "unchecked_ratio_to_disk": rate["reader_unchecked"] / rate["disk"],
        "checked_vs_unchecked": rate["reader"] / rate["reader_unchecked"],
        "in_process_unchecked_MBps": mb / total["reader_in_process_unchecked"],
        "in_process_checked_vs_unchecked": total["reader_in_process_unchecked"] / total["reader_in_process"],
        "crc_MBps": crc_rate,
        "crc_implementation": CRC32_IMPLEMENTATION,
    }


def _crc_rate() -> float:
    """MB/s of the cache's checksum (zlib CRC-32) on an in-memory fp16 array, one thread."""
    from mfcache.cache.schema import checksum

    values = np.random.default_rng(0).standard_normal((1 << 20, 64)).astype(np.float16)  # 128 MiB
    checksum(values)
    start = time.perf_counter()
    for _ in range(3):
        checksum(values)
    return 3 * values.nbytes / 1e6 / (time.perf_counter() - start)


def write_r50_checkpoint(path: Path, shortest_edge: int = 512) -> str:
    """Save a full-size Deformable DETR R50 (box refine, random weights: the compute of a real
    one) labelled with the shapes categories; returns its ``hf:`` spec."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    from mfcache.data.shapes import CATEGORIES

    torch.manual_seed(0)
    config = DeformableDetrConfig(
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
        with_box_refine=True,
        num_labels=len(CATEGORIES),
        id2label=dict(enumerate(CATEGORIES)),
    )
    DeformableDetrForObjectDetection(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": shortest_edge, "longest_edge": shortest_edge * 5 // 3},
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            }
        )
    )
    return f"hf:{path}"


def bench_extract_overhead(quick: bool) -> dict:
    """``mfcache extract`` wall time vs the detector's forward passes alone on the same
    (pre-decoded) images at the same batch size: what decoding, top-k, targets and writing add.
    Measured for the tiny demo detector (the worst case: its forward pass is cheap) and for a
    full-size Deformable DETR R50 at 512 px (what extraction is for)."""
    return {
        "demo": _extract_overhead("demo", *((16, 4, 2) if quick else (64, 4, 3))),
        "r50": _extract_overhead("r50", *((16, 2, 2) if quick else (32, 2, 3)), block=8),
    }


def _extract_overhead(which: str, images: int, batch: int, repeats: int, block: int = 16) -> dict:
    """``block``: images per write. Small runs use a block under the default 16 so that
    most writes overlap the detector, as they do in a long run (the last block's write
    cannot: it is part of the measured time either way)."""
    from mfcache.config import ExtractConfig
    from mfcache.data.shapes import write_shapes_dataset
    from mfcache.data.transforms import load_image, pad_batch, to_input
    from mfcache.detectors import load_detector
    from mfcache.stages.extract import extract

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        write_shapes_dataset(tmp / "data", num_train=images, num_val=0, seed=0, min_size=256, max_size=320)
        spec = "demo" if which == "demo" else write_r50_checkpoint(tmp / "r50")
        detector = load_detector(spec, device=torch.device("cpu"))
        order = [
            im["file_name"] for im in json.loads((tmp / "data" / "annotations" / "train.json").read_text())["images"]
        ]
        inputs = [to_input(load_image(tmp / "data" / "train" / f), detector.info.preprocess) for f in order]
        config = ExtractConfig(batch_size=batch, block_size=block, num_workers=1, device="cpu")
        runs = iter(range(1000))

        @torch.no_grad()
        def forward_only():
            for j in range(0, images, batch):
                detector(*pad_batch(inputs[j : j + batch], detector.info.preprocess))

        def full_extract():
            extract(
                detector=spec,
                images=tmp / "data" / "train",
                annotations=tmp / "data" / "annotations" / "train.json",
                out=tmp / f"cache{next(runs)}",
                config=config,
                progress=False,
            )

        forward_only()  # warm-up: first-call costs belong to neither side
        times: dict[str, list[float]] = {"forward": [], "extract": []}
        for _ in range(repeats):
            for name, fn in (("forward", forward_only), ("extract", full_extract)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in times.items()}
    return {
        "detector": which,
        "images": images,
        "batch": batch,
        "block": block,
        "size": "256-320 px originals",
        "forward_s": t["forward"],
        "extract_s": t["extract"],
        "overhead": t["extract"] / t["forward"],
    }


def projected_bytes(
    info, hw: tuple[int, int], *, dtype: str, c1: bool, topk: int = 100, target_size: int = 64, levels=None
) -> int:
    """Bytes one image of original size ``hw`` takes in a cache, from the schema's own plan
    (chunk padding of the ragged arrays included; index arrays and attrs excluded)."""
    from mfcache.cache.schema import IMAGE_ARRAYS, SCALE_ARRAYS, packed_bytes, plan_split

    plan = plan_split([0], [hw], info, 0, levels)
    item = {"float16": 2, "float32": 4, "int8": 1}[dtype]
    dims = {"K": topk, "D": info.d_model, "C": info.c1_channels, "L": len(info.strides), "B": packed_bytes(target_size)}
    total = int(plan.token_offset[-1]) * info.d_model * item
    if c1:
        total += int(plan.c1_offset[-1]) * info.c1_channels * item
    for name, (array_dtype, trailing, _) in IMAGE_ARRAYS.items():
        if name.startswith("index/"):
            continue
        total += int(np.prod([dims[t] if isinstance(t, str) else t for t in trailing])) * (
            np.dtype(array_dtype).itemsize if array_dtype else item
        )
    if dtype == "int8":
        total += 4 * sum(dims[t] for k, (t, _) in SCALE_ARRAYS.items() if c1 or k != "scales/c1")
    return total


def bench_storage(quick: bool) -> dict:
    """Bytes per image as stored for each dtype / C1 policy on the demo detector and shapes
    data, and the projection for COCO train2017 with Deformable DETR R50 at 800x1333."""
    from mfcache.cache.reader import Cache
    from mfcache.config import ExtractConfig
    from mfcache.data.shapes import write_shapes_dataset
    from mfcache.detectors.base import DetectorInfo, Preprocess
    from mfcache.stages.extract import extract

    measured = {}
    images = 8 if quick else 32
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        write_shapes_dataset(tmp / "data", num_train=images, num_val=0, seed=0, min_size=128, max_size=192)
        for dtype, compress in (("float32", False), ("float16", False), ("int8", False), ("float16", True)):
            out = tmp / f"{dtype}{compress}"
            extract(
                detector="demo",
                images=tmp / "data" / "train",
                annotations=tmp / "data" / "annotations" / "train.json",
                out=out,
                config=ExtractConfig(dtype=dtype, compress=compress, num_workers=0, device="cpu", c1="store"),
                progress=False,
            )
            group = Cache(out).split().group
            stored = {p: n.nbytes_stored() for p, n in group.members(max_depth=None) if hasattr(n, "nbytes_stored")}
            total = sum(v for k, v in stored.items() if k != "annotations")
            c1_bytes = sum(v for k, v in stored.items() if k in ("c1", "scales/c1"))
            name = dtype + ("+zstd" if compress else "")
            measured[f"{name} c1=store"] = total / images
            measured[f"{name} c1=none"] = (total - c1_bytes) / images
            measured[f"{name} c1=recompute"] = (total - c1_bytes) / images  # + the C1 program, once per cache
    r50 = DetectorInfo(
        spec="deformable-detr-r50",
        family="deformable_detr",
        d_model=256,
        num_queries=300,
        label_names=("x",) * 91,
        strides=(8, 16, 32, 64),
        c1_channels=256,
        sigmoid=True,
        weights_sha256="",
        preprocess=Preprocess(shortest_edge=800, longest_edge=1333, pad_divisor=64),
    )
    hw = (480, 640)  # the most common COCO image size -> 800 x 1067 input
    projection = {}
    for dtype in ("float16", "int8"):
        # --c1 auto recomputes for this detector (it has a C1 stem): it stores what c1=none stores
        for c1, label in (("store", "store"), ("recompute", "recompute (--c1 auto)"), ("none", "none")):
            per_image = projected_bytes(r50, hw, dtype=dtype, c1=c1 == "store")
            projection[f"{dtype} c1={label}"] = {
                "bytes_per_image": per_image,
                "train2017_TB": per_image * COCO_TRAIN2017_IMAGES / 1e12,
            }
    levels01 = projected_bytes(r50, hw, dtype="int8", c1=False, levels=[0, 1])
    projection["int8 c1=none levels=0,1"] = {
        "bytes_per_image": levels01,
        "train2017_TB": levels01 * COCO_TRAIN2017_IMAGES / 1e12,
    }
    return {
        "demo_bytes_per_image": measured,
        "coco_projection": projection,
        "projection_setup": "Deformable DETR R50, 4 levels d=256, C1 256 ch at stride 4, top-100, 64x64 targets, "
        "480x640 image -> 800x1067 input, x 118287 train2017 images",
    }


def rows(results: dict) -> list[str]:
    """Markdown table rows for the benchmarks above that ran."""
    out = []
    if "reader" in results:
        r = results["reader"]
        out.append(
            f"| reader.ratio_to_disk (cold page cache, {r['workers']} workers, fp16 R50-like 480x640, "
            f"MB/s after the first batch) | {r['reader_MBps']:.0f} MB/s vs {r['disk_MBps']:.0f} MB/s "
            f"sequential read | {r['ratio_to_disk']:.2f}x |"
        )
        out.append(
            f"| the same, {r['images']} images end to end with the workers' start "
            f"({r['first_batch_s']:.2f} s to the first batch) | | {r['cold_ratio_to_disk']:.2f}x |"
        )
        out.append(
            f"| reader in the training process (train.num_workers=0: no overlap with compute) | "
            f"{r['in_process_MBps']:.0f} MB/s vs {r['disk_MBps']:.0f} MB/s | {r['in_process_ratio_to_disk']:.2f}x |"
        )
        out.append(
            f"| reader concurrent vs serial fetch per image | {r['reader_MBps']:.0f} vs {r['reader_serial_MBps']:.0f} MB/s "
            f"| {r['concurrent_speedup']:.2f}x |"
        )
        if "checked_vs_unchecked" in r:
            out.append(
                f"| reader integrity check (CRC-32 of every part read) on vs off, {r['workers']} workers | "
                f"{r['reader_MBps']:.0f} vs {r['unchecked_MBps']:.0f} MB/s (off: {r['unchecked_ratio_to_disk']:.2f}x "
                f"disk) | {r['checked_vs_unchecked']:.2f}x |"
            )
            out.append(
                f"| the same in the training process | {r['in_process_MBps']:.0f} vs "
                f"{r['in_process_unchecked_MBps']:.0f} MB/s; CRC-32 alone ({r.get('crc_implementation', 'zlib')}) {r['crc_MBps']:.0f} MB/s on one core "
                f"| {r['in_process_checked_vs_unchecked']:.2f}x |"
            )
    for r in results.get("extract", {}).values():
        out.append(
            f"| extract.overhead ({r['detector']} detector, {r['images']} images, batch {r['batch']}, block {r['block']}, "
            f"model load included) | {r['extract_s']:.2f} s extract vs {r['forward_s']:.2f} s forward only "
            f"| {r['overhead']:.2f}x |"
        )
    if "storage" in results:
        r = results["storage"]
        for name, b in r["demo_bytes_per_image"].items():
            out.append(f"| storage demo {name} | {b / 1024:.0f} KiB/image | |")
        for name, p in r["coco_projection"].items():
            out.append(
                f"| storage COCO train2017 R50 {name} | {p['bytes_per_image'] / 2**20:.1f} MiB/image, "
                f"{p['train2017_TB']:.2f} TB | |"
            )
    return out
