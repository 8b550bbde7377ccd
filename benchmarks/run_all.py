"""Measure what mfcache's design choices buy, as ratios taken side by side in one run.

    python benchmarks/run_all.py --quick --out bench-out

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the table. Each benchmark
times the mfcache path and its baseline alternately (interleaved repeats, median), so load
from other processes on a shared machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cache_io import bench_extract_overhead, bench_reader, bench_storage, write_r50_checkpoint
from cache_io import rows as cache_io_rows
from common import interleaved
from peers import bench_peers
from peers import rows as peers_rows

PAPER_SCALE_JSON = Path(__file__).parent / "results" / "paper_scale.json"


def bench_paste(quick: bool) -> dict:
    """Batched paste + RLE (mfcache.ops.masks) vs torchvision's per-mask paste loop + RLE."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from mfcache.ops.masks import encode_rle, paste_masks

    torch.manual_seed(0)
    n, height, width = 100, 480, 640
    masks = torch.rand(n, 28, 28)
    xy = torch.rand(n, 2) * torch.tensor([width * 0.8, height * 0.8])
    boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2) * 150], 1)

    def ours():
        encode_rle(paste_masks(masks, boxes, (height, width), threshold=0.5))

    def torchvision_loop():
        pasted = paste_masks_in_image(masks[:, None], boxes, (height, width))[:, 0] >= 0.5
        encode_rle(pasted)

    t = interleaved({"mfcache": ours, "torchvision": torchvision_loop}, 3 if quick else 10)
    return {
        "masks": n,
        "image": [height, width],
        "mfcache_s": t["mfcache"],
        "torchvision_s": t["torchvision"],
        "paste_speedup": t["torchvision"] / t["mfcache"],
    }


def bench_roi_align(quick: bool) -> dict:
    """Forward + backward of the baseline head's RoIAlign: matmul form vs torchvision."""
    from torchvision.ops import roi_align as reference

    from mfcache.heads.roi import roi_align

    torch.manual_seed(0)
    features = torch.randn(8, 128, 64, 96, requires_grad=True)
    xy = torch.rand(64, 2) * 300
    rois = torch.cat([torch.randint(0, 8, (64, 1)).float(), xy, xy + 8 + torch.rand(64, 2) * 80], 1)

    def step(fn):
        return lambda: fn().square().sum().backward()

    t = interleaved(
        {
            "mfcache": step(lambda: roi_align(features, rois, 32, 0.25, 2)),
            "torchvision": step(lambda: reference(features, rois, 32, 0.25, 2, aligned=True)),
        },
        3 if quick else 10,
    )
    return {
        "rois": 64,
        "map": [8, 128, 64, 96],
        "mfcache_s": t["mfcache"],
        "torchvision_s": t["torchvision"],
        "speedup": t["torchvision"] / t["mfcache"],
    }


def bench_cache_payoff(quick: bool) -> dict:
    """Mask-head training images/s fed from the cache vs fed live by the same frozen
    full-size Deformable DETR R50 (random weights: the compute is the same) at 512 px."""
    from mfcache.config import resolve_run_config
    from mfcache.data.shapes import write_shapes_dataset
    from mfcache.data.transforms import load_image, pad_batch, to_input
    from mfcache.detectors import load_detector
    from mfcache.detectors.base import select_topk
    from mfcache.heads import build_head
    from mfcache.ops.losses import mask_losses
    from mfcache.stages.extract import extract
    from mfcache.stages.train import train

    batch, images = 2, 4 if quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shapes_dataset(tmp / "data", num_train=images, num_val=1, seed=0)
        spec = write_r50_checkpoint(tmp / "r50")
        extract(
            detector=spec,
            images=tmp / "data" / "train",
            out=tmp / "cache",
            annotations=tmp / "data" / "annotations" / "train.json",
            progress=False,
        )

        detector = load_detector(spec)
        run_config = resolve_run_config("box_baseline")
        head = build_head(run_config.head, d_model=256, c1_channels=detector.info.c1_channels, num_levels=4)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
        files = sorted((tmp / "data" / "train").glob("*.png"))[:batch]
        pixels, mask = pad_batch(
            [to_input(load_image(f), detector.info.preprocess) for f in files], detector.info.preprocess
        )

        # The cached run first: the live side then trains on as many queries per image as it did.
        steps = 10 if quick else 40
        start = time.perf_counter()
        train(
            cache_path=tmp / "cache",
            run_dir=tmp / "run",
            progress=False,
            config=resolve_run_config(
                "box_baseline", [f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=1"]
            ),
        )
        cached = (time.perf_counter() - start) / (steps * batch)
        logged = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
        per_image = max(1, round(statistics.mean(e["positives"] for e in logged) / batch))

        def live_step():
            out = detector(pixels, mask)
            top = select_topk(out, 100, sigmoid=True)
            h8, w8 = out.spatial_shapes[0].tolist()
            level = out.memory[:, : h8 * w8].transpose(1, 2).reshape(batch, -1, h8, w8)
            select = torch.zeros(top.scores.shape, dtype=torch.bool)
            select[:, :per_image] = True
            result = head(top.queries, top.boxes, [level], out.c1, select)
            loss = mask_losses(result.mask_logits, torch.rand(len(result.mask_logits), 32, 32).round())["bce"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        live = interleaved({"live": live_step}, 1 if quick else 3)["live"] / batch
    return {
        "live_s_per_image": live,
        "cache_s_per_image": cached,
        "ratio": live / cached,
        "positives_per_image": per_image,
        "setup": "Deformable DETR R50 (box refine, random weights), 512 px shortest edge, box_baseline head",
    }


def bench_paper_scale(quick: bool, path: Path = PAPER_SCALE_JSON) -> dict:
    """Bytes per image per detector and storage option, as ``benchmarks/paper_scale.py``
    measured them on written caches (read from its JSON: extracting full-size detectors at
    800x1333 takes minutes per option on a CPU), with that run's date and machine."""
    if not path.is_file():
        return {"skipped": f"{path} not found: run benchmarks/paper_scale.py --out {path.parent} first"}
    measured = json.loads(path.read_text())
    meta = measured["meta"]
    return {
        "source": str(path),
        "measured": meta["started"],
        "device": meta["device_name"],
        "quick": meta["quick"],
        "bytes_per_image": measured["bytes_per_image"],
        "train2017_TB": {
            det: {name: b * 118_287 / 1e12 for name, b in options.items()}
            for det, options in measured["bytes_per_image"].items()
        },
    }


BENCHMARKS = {
    "eval": bench_paste,
    "roi_align": bench_roi_align,
    "reader": bench_reader,
    "extract": bench_extract_overhead,
    "storage": bench_storage,
    "cache_payoff": bench_cache_payoff,
    "peers": bench_peers,
    "paper_scale": bench_paper_scale,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these (e.g. --only peers)")
    parser.add_argument(
        "--paper-scale-json",
        type=Path,
        default=PAPER_SCALE_JSON,
        help="paper_scale.py's JSON, the source of the paper_scale section",
    )
    args = parser.parse_args()
    benchmarks = {**BENCHMARKS, "paper_scale": functools.partial(bench_paper_scale, path=args.paper_scale_json)}
    torch.set_num_threads(2)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
        },
        "quick": args.quick,
    }
    for name in args.only or BENCHMARKS:
        print(f"running {name} ...", flush=True)
        results[name] = benchmarks[name](args.quick)
        if name == "peers":  # the paper-scale payoff is measured with the peers, filed with the payoff
            results.setdefault("cache_payoff", {}).update(results["peers"].pop("cache_payoff"))
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    rows = ["| benchmark | measured | ratio |", "|---|---|---|"]
    if "eval" in results:
        r = results["eval"]
        rows.append(
            f"| eval.paste_speedup (100 masks, 480x640, + RLE) | {r['mfcache_s'] * 1e3:.0f} ms vs "
            f"{r['torchvision_s'] * 1e3:.0f} ms (torchvision loop) | {r['paste_speedup']:.2f}x |"
        )
    if "roi_align" in results:
        r = results["roi_align"]
        rows.append(
            f"| roi_align fwd+bwd (64 RoIs, 8x128x64x96) | {r['mfcache_s'] * 1e3:.0f} ms vs "
            f"{r['torchvision_s'] * 1e3:.0f} ms (torchvision) | {r['speedup']:.2f}x |"
        )
    rows += cache_io_rows(results)
    if "ratio" in results.get("cache_payoff", {}):
        r = results["cache_payoff"]
        rows.append(
            f"| cache_payoff.ratio (head training, s/image) | {r['cache_s_per_image']:.3f} s cached vs "
            f"{r['live_s_per_image']:.2f} s live R50 | {r['ratio']:.1f}x |"
        )
    rows += peers_rows(results)
    if "bytes_per_image" in results.get("paper_scale", {}):
        r = results["paper_scale"]
        for det, options in r["bytes_per_image"].items():
            for name, b in options.items():
                rows.append(
                    f"| paper_scale.bytes_per_image {det} {name} ({r['measured']}, written cache) | "
                    f"{b / 2**20:.2f} MiB/image, {r['train2017_TB'][det][name]:.2f} TB train2017 | |"
                )
    load = results["machine"]
    rows.append(
        f"\nload average (1/5/15 min) at start {load['load_average_at_start']}, "
        f"at end {load['load_average_at_end']} on {os.cpu_count()} cores"
    )
    table = "\n".join(rows)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
