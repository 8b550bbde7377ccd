"""The two pixel paths (``--resize processor`` and ``--resize float``) side by side on the demo
detector: bbox AP on the shapes val images, how often the top-10 ranking changes, the
largest pixel and score differences, and what each path costs per image.

    python benchmarks/preprocessing.py --out bench-out/preprocessing.json [--val 200]

The val images are ``mfcache data shapes`` with seed 0 (the first 100 are the ones
``mfcache demo`` evaluates on; the shipped detector's ``training.json`` AP is on all 200).
AP is computed as ``mfcache.demo_detector.evaluate.evaluate_bbox`` does (top-100 per image, original pixels).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def top10(detector, coco, preprocess, batch_size: int) -> list[dict]:
    """Per image: the top-10 detections in rank order (``labels [10]``, ``boxes [10, 4]``
    xyxy input pixels, ``scores [10]``)."""
    from mfcache.data.transforms import load_image, pad_batch, to_input
    from mfcache.detectors.base import select_topk

    found = []
    for start in range(0, len(coco), batch_size):
        images = coco.images[start : start + batch_size]
        inputs = [to_input(load_image(coco.image_path(im)), preprocess) for im in images]
        top = select_topk(detector(*pad_batch(inputs, preprocess)), 10, sigmoid=True)
        found += [{"labels": l, "boxes": b, "scores": s} for l, b, s in zip(top.labels, top.boxes, top.scores)]
    return found


def same_ranking(a: dict, b: dict, iou: float = 0.9) -> bool:
    """Rank by rank the same detection: same label and box IoU >= ``iou`` (query indices are
    not compared: a two-stage model numbers its queries by proposal rank)."""
    from torchvision.ops import box_iou

    return bool((a["labels"] == b["labels"]).all() and (box_iou(a["boxes"], b["boxes"]).diagonal() >= iou).all())


def seconds_per_image(preprocess, hw: tuple[int, int], repeats: int = 20) -> float:
    """Median seconds of ``to_input`` on one random ``uint8`` image of ``hw`` pixels."""
    from mfcache.data.transforms import to_input

    image = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    to_input(image, preprocess)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        to_input(image, preprocess)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/preprocessing.json"))
    parser.add_argument("--data", type=Path, help="a shapes dataset (default: generate seed 0 in a temp dir)")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from mfcache.data.coco import CocoDataset
    from mfcache.data.shapes import write_shapes_dataset
    from mfcache.data.transforms import load_image, to_input
    from mfcache.demo_detector.evaluate import evaluate_bbox
    from mfcache.detectors import load_detector

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        if args.data is None:
            write_shapes_dataset(data, num_train=0, num_val=args.val, seed=0)
        full = CocoDataset(data / "annotations" / "val.json", data / "val")
        paths = {"float": load_detector("demo", resize="float"), "processor": load_detector("demo", resize="processor")}
        subsets = {f"first {min(100, len(full))} (mfcache demo)": 100, f"all {len(full)}": len(full)}
        rows = {}
        val = json.loads((data / "annotations" / "val.json").read_text())
        for label, n in subsets.items():
            keep = {im["id"] for im in val["images"][:n]}
            subset = Path(tmp) / f"val-{n}.json"
            subset.write_text(
                json.dumps(
                    {
                        **val,
                        "images": val["images"][:n],
                        "annotations": [a for a in val["annotations"] if a["image_id"] in keep],
                    }
                )
            )
            coco = CocoDataset(subset, data / "val")
            rows[label] = {
                name: evaluate_bbox(det.model, coco, torch.device("cpu"), args.batch_size, det.info.preprocess)
                for name, det in paths.items()
            }
        found = {name: top10(det, full, det.info.preprocess, args.batch_size) for name, det in paths.items()}
        changed = [i for i, (a, b) in enumerate(zip(found["float"], found["processor"])) if not same_ranking(a, b)]
        same = [i for i in range(len(full)) if i not in changed]
        # rank-wise score differences where the ranking is the same (elsewhere they compare different objects)
        score_diff = max(
            (float((found["float"][i]["scores"] - found["processor"][i]["scores"]).abs().max()) for i in same),
            default=0.0,
        )
        pre = {name: det.info.preprocess for name, det in paths.items()}
        pixel_diff = max(
            float(
                (
                    to_input(load_image(full.image_path(im)), pre["float"])
                    - to_input(load_image(full.image_path(im)), pre["processor"])
                )
                .abs()
                .max()
            )
            for im in full.images
        )
    coco_pre = {name: replace(p, shortest_edge=800, longest_edge=1333, pad_size=None) for name, p in pre.items()}
    timing = {
        name: {
            "demo 256x192 -> 192x144": seconds_per_image(p, (256, 192)),
            "COCO 480x640 -> 800x1066": seconds_per_image(coco_pre[name], (480, 640), repeats=5),
        }
        for name, p in pre.items()
    }

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "val_images": len(full),
        "bbox": rows,
        "top10_changed_images": len(changed),
        "top10_changed_ids": [full.images[i].id for i in changed],
        "max_score_diff_same_ranking": score_diff,
        "max_pixel_diff": pixel_diff,
        "to_input_seconds": timing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| val images | path | bbox AP | AP50 | AP75 |\n|---|---|---|---|---|")
    for label, by_path in rows.items():
        for name, m in by_path.items():
            print(f"| {label} | {name} | {m['AP']:.4f} | {m['AP50']:.4f} | {m['AP75']:.4f} |")
    print(
        f"top-10 ranking (label, box IoU >= 0.9 rank by rank) differs on {len(changed)} of {len(full)} images; "
        f"max score difference elsewhere {score_diff:.2e}; max pixel difference {pixel_diff:.4f}"
    )
    for name, t in timing.items():
        print(f"to_input {name}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()))


if __name__ == "__main__":
    main()
