"""Measure and check mfcache on a GPU, in one prepared command (under 8 minutes on an H200).

    python benchmarks/gpu_check.py --out gpu-out                    # on the GPU machine
    python benchmarks/gpu_check.py --out tmp --device cpu --quick   # the same code on a CPU (its test)

Writes ``OUT/gpu.json`` and ``OUT/gpu.md`` (a markdown table per section) and prints the
markdown. Sections, each timed, each wrapped so that a failure is recorded as
``{"error": ...}`` and the next section still runs; the JSON is written after every section,
so a run cut short keeps what finished:

1. ``environment``: device, driver (nvidia-smi), torch / torchvision / CUDA / cuDNN, CPUs.
2. ``agreement``: CPU vs CUDA on the same random inputs (MSDA, RoIAlign values and gradients,
   three heads forward and backward, mask paste, a demo extraction read back from the cache);
   max abs / relative difference and pass/fail against a stated tolerance. Skipped on a CPU.
3. ``demo``: ``mfcache demo`` on the device: wall time and segm AP against the CPU's 0.411.
4. ``extraction``: images/s of ``mfcache extract`` with a full-size H-DETR R50 and Deformable
   DETR R50 (random weights) at 800x1333, AMP off and bf16, against the detector's forward
   alone on the same decoded images; bytes per image of the cache.
5. ``training``: head training images/s from section 4's cache (box_baseline, blendmask,
   paper_final; AMP off and bf16), peak GPU memory, and the reader alone (reader-bound or not).
6. ``projection``: COCO train2017 hours (extraction; the paper's 88,500 x 8 head schedule) and TB.
7. ``sweep`` (only when asked: ``--only sweep``, about 10 minutes on an H200): the heads the
   CPU cannot train at the demo's budget (RoI-token transformers, the FCN), ``paper_final``
   first, and ``blendmask`` as the reference, each 1500 steps of 8 at lr 1e-3 on the demo
   cache (built in the run), then COCO AP: the ablation sweep of docs/heads.md, completed.

``--quick`` shrinks every section (on a CPU: tiny detectors at 64 px, a few images and steps);
its figures check that the code runs, they measure nothing. ``--budget-s`` (default 480):
once the run is past it, what remains is recorded as skipped rather than started.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cache_io import COCO_TRAIN2017_IMAGES, write_r50_checkpoint
from common import cpu_name, disk_bytes, fmt, interleaved, positives_threshold, write_native_checkpoint, write_report

CPU_DEMO_SEGM_AP = 0.411  # docs/getting-started.md: the default demo on the project's CPU machine
DEMO_AP_TOLERANCE = 0.005
PAPER_STEPS, PAPER_BATCH = 88_500, 8
HEADS = ("box_baseline", "blendmask", "paper_final")
# the sweep's heads (docs/heads.md) that need a GPU, most wanted first: paper_final and its reference at equal steps
SWEEP_HEADS = ("paper_final", "blendmask", "box_encoder", "query_box_cross_attn", "fcn", "mask_scoring")
SWEEP_STEPS, SWEEP_LR = 1500, 1e-3  # the sweep's budget (docs/heads.md) (the demo's: 30 epochs of 400 images)
AMPS = ("off", "bf16")
READER_MARGIN = 1.5  # the reader alone must be this much faster than training, or training is reader-bound


# ----------------------------------------------------------------------------- 7. sweep
def section_sweep(run: Run) -> dict:
    """``SWEEP_HEADS`` trained on the demo cache as the sweep of docs/heads.md trains its heads (1500
    steps of 8, lr 1e-3, seed 0) and evaluated: segm AP, seconds, and each head's seconds per
    step against ``blendmask``'s (what "equal wall time" means on this device). Heads past the
    budget are recorded as skipped."""
    from mfcache.stages.demo import demo_cache
    from mfcache.stages.sweep import sweep

    demo = {k: v for k, v in run.plan.demo.items() if k != "steps"}
    cache = demo_cache(
        run.work / "sweep",
        device=str(run.device),
        progress=False,
        say=lambda message: run.log(f"  sweep: {message}"),
        **demo,
    )
    batch = run.plan.sweep_batch
    out = {
        "settings": f"demo cache ({demo or 'defaults: 400 train / 100 val images'}), "
        f"{run.plan.sweep_steps} steps of {batch}, lr {SWEEP_LR:g}, seed 0",
        "heads": [],
    }
    for name in SWEEP_HEADS:
        if run.over_budget():
            out["heads"].append({"head": name, **over_budget_note(run)})
            continue
        run.log(f"  sweep: {name}")
        try:
            row = sweep(
                cache_path=cache,
                heads=[name],
                out_dir=run.work / "sweep" / "runs",
                steps=run.plan.sweep_steps,
                device=str(run.device),
                overrides=[
                    f"train.lr={SWEEP_LR}",
                    f"train.batch_size={batch}",
                    f"train.num_workers={run.plan.train_workers}",
                    *run.plan.sweep_overrides,
                ],
                progress=False,
            )[0]
            out["heads"].append(
                {
                    "head": name,
                    "segm_AP": row["segm_AP"],
                    "segm_AP50": row["segm_AP50"],
                    "params": row["params"],
                    "train_seconds": row["train_seconds"],
                    "s_per_step": row["train_seconds"] / run.plan.sweep_steps,
                }
            )
        except Exception as exc:  # the next head still runs
            out["heads"].append({"head": name, "error": f"{type(exc).__name__}: {exc}"})
        run.free()
        run.results["sweep"] = {**out, "unfinished": True}  # a run killed mid-section keeps its heads
        save(run)
    reference = next((h["s_per_step"] for h in out["heads"] if h["head"] == "blendmask" and "s_per_step" in h), None)
    for h in out["heads"]:
        if reference and "s_per_step" in h:
            h["over_blendmask"] = h["s_per_step"] / reference
    shutil.rmtree(run.work / "sweep", ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """Image and step counts of one run (full on a GPU, shrunk with --quick)."""

    demo: dict  # run_demo keyword arguments
    sweep_steps: int
    extract_images: int  # images per extraction setting
    extract_small: int  # 0 = no steady-state (marginal) rate; else images of the short run subtracted
    shortest_edge: int
    full_size: bool  # full-size R50 detectors (else tiny ones)
    forward_repeats: int
    extract_workers: int
    warmup_steps: int
    steps: int
    train_workers: int
    positives: int = 20  # training queries per image aimed at (see positives_threshold)
    sweep_batch: int = 8
    sweep_overrides: tuple[str, ...] = ()  # --quick on a CPU: fewer detections per image to evaluate

    @classmethod
    def make(cls, device: torch.device, quick: bool) -> Plan:
        cpus = os.cpu_count() or 1
        if not quick:
            return cls(
                demo={},
                sweep_steps=SWEEP_STEPS,
                extract_images=32,
                extract_small=4,
                shortest_edge=800,
                full_size=True,
                forward_repeats=2,
                extract_workers=min(8, max(1, cpus // 2)),
                warmup_steps=5,
                steps=100,
                train_workers=min(4, max(1, cpus // 4)),
            )
        if device.type == "cuda":  # a quick look on a GPU: full-size detectors, few images
            return cls(
                demo=dict(train_images=40, val_images=20, steps=30),
                sweep_steps=30,
                extract_images=8,
                extract_small=2,
                shortest_edge=800,
                full_size=True,
                forward_repeats=1,
                extract_workers=min(4, cpus),
                warmup_steps=2,
                steps=10,
                train_workers=2,
            )
        return cls(
            demo=dict(train_images=6, val_images=3, steps=3),
            sweep_steps=2,
            sweep_batch=1,
            sweep_overrides=("eval.max_detections=5",),
            extract_images=2,
            extract_small=0,
            shortest_edge=64,
            full_size=False,
            forward_repeats=1,
            extract_workers=0,
            warmup_steps=1,
            steps=2,
            train_workers=0,
            positives=1,
        )


@dataclass
class Run:
    device: torch.device
    quick: bool
    out: Path
    work: Path
    budget_s: float
    plan: Plan
    results: dict = field(default_factory=dict)
    min_iou: float = 0.5  # train.min_iou of section 5 (see positives_threshold)
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def log(self, message: str) -> None:
        print(f"[{datetime.datetime.now():%H:%M:%S} +{self.elapsed():6.1f}s] {message}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def over_budget_note(run: Run) -> dict:
    return {"skipped": f"over the time budget ({run.elapsed():.0f} s > {run.budget_s:.0f} s)"}


# ----------------------------------------------------------------------------- 1. environment
def section_environment(run: Run) -> dict:
    """Device name, driver, library versions, CPUs, and the float32 matmul/conv modes (TF32)."""
    import torchvision

    env = {
        "device": str(run.device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            env["driver"] = smi.stdout.strip().splitlines()[0].split(",")[-1].strip() if smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"failed: {exc}"
    else:
        env["nvidia_smi"] = "not found"
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        env.update(
            device_name=props.name,
            gpu_memory_GiB=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        env["device_name"] = env["cpu"]
    return env


# ----------------------------------------------------------------------------- 2. agreement
def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that / max |b|): b is the CPU reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - b).abs().max().item()
    return diff, diff / max(b.abs().max().item(), 1e-30)


def item(name: str, a: torch.Tensor, b: torch.Tensor, tolerance: float, note: str = "") -> dict:
    """One comparison: pass if the relative difference (max |a - b| / max |b|) is within ``tolerance``."""
    max_abs, rel = difference(a, b)
    return {
        "item": name,
        "max_abs": max_abs,
        "rel": rel,
        "tolerance": tolerance,
        "pass": bool(math.isfinite(rel) and rel <= tolerance),
        "note": note,
    }


# Sizes of the comparisons: full (realistic: an 800x1067 input's maps) and --quick.
AGREE_SIZES = {
    "full": {
        "msda_shapes": [[100, 134], [50, 67], [25, 34], [13, 17]],
        "msda_queries": 300,
        "roi_channels": 64,
        "roi_map": (200, 267),
        "rois": 200,
        "head_d": 256,
        "head_c1": 256,
        "head_hw": (512, 683),
        "head_queries": 100,
        "head_selected": 40,
        "paste_masks": 100,
        "extract_images": 8,
    },
    "quick": {
        "msda_shapes": [[20, 27], [10, 14], [5, 7], [3, 4]],
        "msda_queries": 50,
        "roi_channels": 16,
        "roi_map": (50, 67),
        "rois": 50,
        "head_d": 64,
        "head_c1": 16,
        "head_hw": (128, 171),
        "head_queries": 20,
        "head_selected": 5,
        "paste_masks": 20,
        "extract_images": 2,
    },
}


def section_agreement(run: Run) -> dict:
    """CPU vs CUDA on the same inputs. Tolerances are on max |cuda - cpu| / max |cpu|: 1e-5 for
    float32 ops without matmuls (MSDA, paste), 1e-4 for RoIAlign (its matmuls' summation order), 1e-2 for
    heads and whole detectors (cuDNN convolutions run in TF32 by default, ~1e-3 relative each;
    the cache stores float16, ~1e-3)."""
    if not run.cuda:
        return {"skipped": "needs a CUDA device (--device cpu)"}
    return agreement(run)


def agreement(run: Run) -> dict:
    """Every comparison of the CPU against ``run.device`` (which tests/benchmarks/test_gpu_check.py sets to
    the CPU itself, to run this code before it meets a GPU)."""
    items: list[dict] = []
    size = AGREE_SIZES["quick" if run.quick else "full"]
    for name, fn in (
        ("ms_deform_attn", _agree_msda),
        ("roi_align", _agree_roi_align),
        ("heads", _agree_heads),
        ("paste_masks", _agree_paste),
        ("demo_extraction", _agree_extraction),
    ):
        run.log(f"  agreement: {name}")
        try:
            items += fn(run, size)
        except Exception as exc:  # one failed comparison does not hide the others
            traceback.print_exc()
            items.append({"item": name, "error": f"{type(exc).__name__}: {exc}", "pass": False})
        run.free()
    return {
        "items": items,
        "passed": sum(i["pass"] for i in items),
        "failed": sum(not i["pass"] for i in items),
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


def _agree_msda(run: Run, size: dict) -> list[dict]:
    """Multi-scale deformable attention (8 heads x 32 channels, 4 points) at the level sizes of an
    800x1067 input, some samples off their level: forward, and the gradients of value and
    attention weights."""
    from mfcache.ops.deformable_attention import ms_deform_attn

    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor(size["msda_shapes"])
    tokens, q = int(shapes.prod(1).sum()), size["msda_queries"]
    value = torch.randn(2, tokens, 8, 32, generator=gen)
    locations = torch.rand(2, q, 8, 4, 4, 2, generator=gen) * 1.2 - 0.1
    weights = torch.randn(2, q, 8, 16, generator=gen).softmax(-1).view(2, q, 8, 4, 4)
    upstream = torch.randn(2, q, 256, generator=gen)

    def run_on(device):
        v, w = value.to(device).requires_grad_(), weights.to(device).requires_grad_()
        out = ms_deform_attn(v, shapes.to(device), locations.to(device), w)
        (out * upstream.to(device)).sum().backward()
        return out, v.grad, w.grad

    (ref, ref_v, ref_w), (got, got_v, got_w) = run_on("cpu"), run_on(run.device)
    return [
        item(f"ms_deform_attn forward [2, {q}, 256] over {tokens} tokens", got, ref, 1e-5),
        item("ms_deform_attn grad value", got_v, ref_v, 1e-5),
        item("ms_deform_attn grad attention weights", got_w, ref_w, 1e-5),
    ]


def _agree_roi_align(run: Run, size: dict) -> list[dict]:
    """The heads' RoIAlign on two stride-4 maps, 32x32 bins: values and the gradient of the maps."""
    from mfcache.heads.roi import roi_align

    gen = torch.Generator().manual_seed(1)
    (h, w), n, c = size["roi_map"], size["rois"], size["roi_channels"]
    features = torch.randn(2, c, h, w, generator=gen)
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 4 * 0.9, h * 4 * 0.9])
    rois = torch.cat(
        [torch.randint(0, 2, (n, 1), generator=gen).float(), xy, xy + 8 + torch.rand(n, 2, generator=gen) * w * 1.2], 1
    )
    upstream = torch.randn(n, c, 32, 32, generator=gen)

    def run_on(device):
        f = features.to(device).requires_grad_()
        out = roi_align(f, rois.to(device), 32, 0.25, 2)
        (out * upstream.to(device)).sum().backward()
        return out, f.grad

    (ref, ref_g), (got, got_g) = run_on("cpu"), run_on(run.device)
    return [
        item(f"roi_align values ({n} RoIs on 2 x {c} x {h} x {w}, 32x32)", got, ref, 1e-4),
        item("roi_align grad of the maps", got_g, ref_g, 1e-4),
    ]


def random_batch(*, d_model: int, c1_channels: int, images: int = 2, queries: int = 100, hw=(512, 683), seed: int = 0):
    """A :class:`~mfcache.cache.sample.Batch` as the cache serves it, random features at the
    sizes of a ``hw`` input (4 levels at strides 8-64, C1 at stride 4)."""
    from mfcache.cache.sample import Batch

    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    xy = torch.rand(images, queries, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
    boxes = torch.cat([xy, xy + 8 + torch.rand(images, queries, 2, generator=gen) * min(h, w) * 0.4], -1)
    levels = [torch.randn(images, d_model, -(-h // s), -(-w // s), generator=gen) for s in (8, 16, 32, 64)]
    c1 = torch.randn(images, c1_channels, -(-h // 4), -(-w // 4), generator=gen)
    return Batch(
        image_id=list(range(images)),
        queries=torch.randn(images, queries, d_model, generator=gen),
        boxes=boxes,
        scores=torch.rand(images, queries, generator=gen),
        labels=torch.zeros(images, queries, dtype=torch.long),
        query_index=torch.arange(queries).expand(images, queries),
        levels=levels,
        level_hw=torch.tensor([m.shape[-2:] for m in levels]).expand(images, -1, -1),
        input_hw=torch.tensor([[h, w]] * images),
        orig_hw=torch.tensor([[h, w]] * images),
        c1=c1,
        c1_hw=torch.tensor([c1.shape[-2:]] * images),
    )


def _agree_heads(run: Run, size: dict) -> list[dict]:
    """Each head on a random batch of 2 images (eval mode: no randomness): mask logits (and
    quality), and every parameter's gradient of a fixed random function of them."""
    from mfcache.config import resolve_run_config
    from mfcache.heads import build_head

    d, c1, k, chosen = size["head_d"], size["head_c1"], size["head_queries"], size["head_selected"]
    items = []
    for name in HEADS:
        torch.manual_seed(0)
        head = build_head(resolve_run_config(name).head, d_model=d, c1_channels=c1, num_levels=4).eval()
        batch = random_batch(d_model=d, c1_channels=c1, queries=k, hw=size["head_hw"])
        batch = dataclasses.replace(
            batch, levels=[batch.levels[level] for level in head.levels], level_hw=batch.level_hw[:, list(head.levels)]
        )
        select = torch.zeros(batch.scores.shape, dtype=torch.bool)
        select[:, :chosen] = True
        gen = torch.Generator().manual_seed(2)
        upstream = torch.randn(2 * chosen, 1, head.roi_size, head.roi_size, generator=gen)
        upstream_q = torch.randn(2 * chosen, generator=gen)
        inputs = (batch, select, upstream, upstream_q)
        ref = _head_forward_backward(copy.deepcopy(head), torch.device("cpu"), *inputs)
        got = _head_forward_backward(copy.deepcopy(head).to(run.device), run.device, *inputs)
        where = f"(d={d}, C1 {c1}, {2 * chosen} RoIs)"
        items.append(item(f"head {name} mask logits {where}", got[0], ref[0], 1e-2))
        if ref[1] is not None:
            items.append(item(f"head {name} quality", got[1], ref[1], 1e-2))
        items.append(item(f"head {name} parameter gradients ({len(ref[2]):,})", got[2], ref[2], 1e-2))
    return items


def _head_forward_backward(module, device, batch, select, upstream, upstream_q):
    """(mask logits, quality or None, every parameter gradient) of ``module`` on ``batch``, all on the CPU."""
    from mfcache.stages.postprocess import run_head

    out = run_head(module, batch.to(device), select.to(device))
    loss = (out.mask_logits.float() * upstream.to(device)).sum()
    if out.quality is not None:
        loss = loss + (out.quality.float().reshape(-1) * upstream_q.to(device)).sum()
    loss.backward()
    grads = torch.cat([p.grad.detach().flatten().cpu() for p in module.parameters() if p.grad is not None])
    return out.mask_logits.detach().cpu(), None if out.quality is None else out.quality.detach().cpu(), grads


def _agree_paste(run: Run, size: dict) -> list[dict]:
    """Mask paste into 480x640 (smooth random masks, boxes partly outside): the float
    probabilities, and the fraction of pixels (of those on in either) whose thresholded value differs."""
    import torch.nn.functional as F

    from mfcache.ops.masks import paste_masks

    n = size["paste_masks"]
    gen = torch.Generator().manual_seed(3)
    masks = F.interpolate(torch.randn(n, 1, 7, 7, generator=gen), size=(28, 28), mode="bilinear").sigmoid()[:, 0]
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([640 * 0.9, 480 * 0.9]) - 20
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * 250], 1)
    ref = paste_masks(masks, boxes, (480, 640), threshold=None)
    got = paste_masks(masks.to(run.device), boxes.to(run.device), (480, 640), threshold=None).cpu()
    ref_b = paste_masks(masks, boxes, (480, 640), threshold=0.5)
    got_b = paste_masks(masks.to(run.device), boxes.to(run.device), (480, 640), threshold=0.5).cpu()
    differ = (ref_b != got_b).sum().item()
    on = (ref_b | got_b).sum().item()
    fraction = differ / max(on, 1)
    return [
        item(f"paste_masks probabilities ({n} masks, 480x640)", got, ref, 1e-5),
        {
            "item": "paste_masks thresholded: pixels that differ / pixels on",
            "max_abs": differ,
            "rel": fraction,
            "tolerance": 1e-4,
            "pass": fraction <= 1e-4,
            "note": f"{differ} of {on} pixels",
        },
    ]


def _agree_extraction(run: Run, size: dict) -> list[dict]:
    """The demo detector extracted on the CPU and on the device (shapes images), read back from
    the two caches: features within tolerance, top-k identical (query_index and labels); the
    queries, boxes and scores compared on the (query, label) pairs both kept."""
    from mfcache.cache.reader import Cache
    from mfcache.config import ExtractConfig
    from mfcache.data.shapes import write_shapes_dataset
    from mfcache.stages.extract import extract

    root = run.work / "agree"
    n = size["extract_images"]
    write_shapes_dataset(root / "data", num_train=n, num_val=0, seed=1)
    splits = {}
    for side, device in (("reference", "cpu"), ("device", str(run.device))):
        extract(
            detector="demo",
            images=root / "data" / "train",
            annotations=root / "data" / "annotations" / "train.json",
            out=root / side,
            config=ExtractConfig(device=device, num_workers=run.plan.extract_workers, c1="store"),  # C1 compared
            progress=False,
        )
        splits[side] = Cache(root / side).split("train")
    ref_split, got_split = splits["reference"], splits["device"]
    pairs: dict[str, tuple[list, list]] = {k: ([], []) for k in ("levels", "c1", "queries", "boxes", "scores")}
    same_topk, matched, total = 0, 0, 0
    for i in range(ref_split.num_rows):
        ref, got = ref_split.read(i), got_split.read(i)
        pairs["levels"][0].extend(level.flatten() for level in got.levels)
        pairs["levels"][1].extend(level.flatten() for level in ref.levels)
        pairs["c1"][0].append(got.c1.flatten())
        pairs["c1"][1].append(ref.c1.flatten())
        same_topk += bool(torch.equal(ref.query_index, got.query_index) and torch.equal(ref.labels, got.labels))
        keys_ref = {key: j for j, key in enumerate(zip(ref.query_index.tolist(), ref.labels.tolist()))}
        keys_got = {key: j for j, key in enumerate(zip(got.query_index.tolist(), got.labels.tolist()))}
        common = [key for key in keys_ref if key in keys_got]
        matched += len(common)
        total += len(keys_ref)
        rows_ref, rows_got = [keys_ref[key] for key in common], [keys_got[key] for key in common]
        for name in ("queries", "boxes", "scores"):
            pairs[name][0].append(getattr(got, name)[rows_got].flatten())
            pairs[name][1].append(getattr(ref, name)[rows_ref].flatten())
    items = [
        item(
            f"demo extraction {name}",
            torch.cat(g),
            torch.cat(r),
            1e-2,
            note="on the (query, label) pairs in both" if name in ("queries", "boxes", "scores") else "float16 cache",
        )
        for name, (g, r) in pairs.items()
    ]
    items.append(
        {
            "item": "demo extraction top-k identical (query_index and labels)",
            "max_abs": n - same_topk,
            "rel": 1 - matched / max(total, 1),
            "tolerance": 0,
            "pass": same_topk == n,
            "note": f"{same_topk}/{n} images identical; {matched}/{total} (query, label) pairs in both",
        }
    )
    shutil.rmtree(root, ignore_errors=True)
    return items


# ----------------------------------------------------------------------------- 3. demo
def section_demo(run: Run) -> dict:
    """``run_demo`` on the device (defaults: 400/100 images, 1500 blendmask steps): wall time per
    stage and segm AP, which must match the CPU demo's recorded 0.411 within 0.005 (not with --quick)."""
    from mfcache.stages.demo import run_demo

    stages: list[tuple[str, float]] = []

    def say(message: str) -> None:
        stages.append((message, time.perf_counter()))
        run.log(f"  demo: {message}")

    result = run_demo(run.work / "demo", device=str(run.device), progress=False, say=say, **run.plan.demo)
    end = time.perf_counter()
    times = [(name, (stages[i + 1][1] if i + 1 < len(stages) else end) - t) for i, (name, t) in enumerate(stages)]
    ap = result.metrics["segm"]["AP"]
    demo = run.plan.demo
    out = {
        "settings": (
            f"{demo['train_images']} train / {demo['val_images']} val images, {demo['steps']} steps"
            if demo
            else "defaults: 400 train / 100 val images, 1500 steps"
        ),
        "head": "blendmask",
        "seconds": result.seconds,
        "stage_seconds": {name.split(":")[0].split()[-1]: s for name, s in times},
        "segm_AP": ap,
        "segm_AP50": result.metrics["segm"]["AP50"],
        "bbox_AP": result.metrics["bbox"]["AP"],
        "detector_trained": result.detector_trained,
    }
    if run.quick:
        out["check"] = "skipped with --quick (a shorter demo)"
    else:
        out.update(
            {
                "cpu_segm_AP": CPU_DEMO_SEGM_AP,
                "tolerance": DEMO_AP_TOLERANCE,
                "pass": bool(abs(ap - CPU_DEMO_SEGM_AP) <= DEMO_AP_TOLERANCE),
            }
        )
    shutil.rmtree(run.work / "demo", ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- 4. extraction
TINY_HDETR = {
    "backbone": "resnet18",
    "d_model": 64,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 96,
    "enc_n_points": 2,
    "dec_n_points": 3,
    "num_queries": 30,
    "num_queries_one2many": 30,
}


def write_tiny_deformable_checkpoint(path: Path, shortest_edge: int) -> str:
    """A tiny Deformable DETR (box refine; ResNet of 16-64 channels, d=64) for --quick on a CPU,
    labelled with the shapes categories; returns its ``hf:`` spec."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    from mfcache.data.shapes import CATEGORIES

    torch.manual_seed(0)
    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=30,
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


def section_extraction(run: Run) -> dict:
    """Per detector and AMP: ``mfcache extract`` images/s end to end (model load included) and in
    steady state (the difference of a long and a short run), the detector's forward alone on the
    same pre-decoded images at the same batch size (median of interleaved repeats, AMP off and
    bf16 alternated), extract / forward (seconds per image), bytes per image; peak GPU memory."""
    from mfcache.config import ExtractConfig
    from mfcache.data.shapes import write_shapes_dataset

    plan = run.plan
    root = run.work / "extraction"
    data = root / "data"
    write_shapes_dataset(data, num_train=plan.extract_images, num_val=0, seed=0, min_size=480, max_size=640)
    annotations = data / "annotations" / "train.json"
    small = None
    if plan.extract_small:
        coco = json.loads(annotations.read_text())
        keep = {im["id"] for im in coco["images"][: plan.extract_small]}
        coco["images"] = [im for im in coco["images"] if im["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        small = data / "annotations" / "train_small.json"
        small.write_text(json.dumps(coco))
    if plan.full_size:
        detectors = {
            "hdetr_r50": lambda: write_native_checkpoint(root / "hdetr", "hdetr", shortest_edge=plan.shortest_edge),
            "deformable_detr_r50": lambda: write_r50_checkpoint(root / "r50", shortest_edge=plan.shortest_edge),
        }
        setup = (
            f"full-size R50 detectors, random weights; H-DETR: two-stage, box refine, mixed selection, 300 "
            f"queries; Deformable DETR: box refine; shortest edge {plan.shortest_edge}"
        )
    else:
        detectors = {
            "hdetr_tiny": lambda: write_native_checkpoint(
                root / "hdetr", "hdetr", shortest_edge=plan.shortest_edge, options=TINY_HDETR
            ),
            "deformable_detr_tiny": lambda: write_tiny_deformable_checkpoint(root / "tiny", plan.shortest_edge),
        }
        setup = (
            f"--quick on a CPU: TINY detectors (ResNet-18 / 16-64 channel ResNet, d=64) at shortest edge "
            f"{plan.shortest_edge}: checks the code path, measures nothing"
        )
    # C1 stored, so section 5 trains from stored maps as before; --c1 auto (recompute for these
    # detectors) stores the same minus the c1 array, projected from its bytes (section 6)
    config = ExtractConfig(device=str(run.device), num_workers=plan.extract_workers, c1="store")
    settings = []
    out = {
        "setup": setup,
        "images": plan.extract_images,
        "image_sizes": "480-640 px originals (shapes, COCO-like)",
        "batch": config.batch_size,
        "block": config.block_size,
        "workers": plan.extract_workers,
        "steady_state_from": f"{plan.extract_images} vs {plan.extract_small} images" if small else None,
        "settings": settings,
    }
    for name, make in detectors.items():
        if run.over_budget():
            settings.append({"detector": name, **over_budget_note(run)})
            continue
        run.log(f"  extraction: writing the {name} checkpoint")
        try:
            spec = make()
            settings.extend(_extract_detector(run, name, spec, data, annotations, small, config))
        except Exception as exc:  # the other detector still runs
            settings.append({"detector": name, "error": f"{type(exc).__name__}: {exc}"})
            run.log(f"  extraction: {name} failed: {type(exc).__name__}: {exc}")
        run.free()
    run.results["_train_cache"] = next((s["cache"] for s in settings if s.get("keep")), None)
    for s in settings:
        s.pop("keep", None)
    return out


def _extract_detector(
    run: Run, name: str, spec: str, data: Path, annotations: Path, small: Path | None, config
) -> list[dict]:
    from mfcache.data.transforms import load_image, to_input
    from mfcache.detectors import load_detector, run_detector
    from mfcache.stages.extract import extract

    plan, root = run.plan, data.parent
    results = []
    for amp in AMPS:
        if run.over_budget():
            results.append({"detector": name, "amp": amp, **over_budget_note(run)})
            continue
        cfg = dataclasses.replace(config, amp=amp)
        row: dict = {"detector": name, "amp": amp}
        if small is not None:
            run.sync()
            start = time.perf_counter()
            extract(
                detector=spec,
                images=data / "train",
                annotations=small,
                out=root / "small",
                split="train",
                config=cfg,
                progress=False,
            )
            run.sync()
            row["extract_small_s"] = time.perf_counter() - start
            shutil.rmtree(root / "small")
        cache = root / f"cache-{name}-{amp}"
        if run.cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        run.sync()
        start = time.perf_counter()
        extract(
            detector=spec,
            images=data / "train",
            annotations=annotations,
            out=cache,
            split="train",
            config=cfg,
            progress=False,
        )
        run.sync()
        seconds = time.perf_counter() - start
        row.update(extract_s=seconds, extract_images_per_s=plan.extract_images / seconds)
        if run.cuda:
            row["extract_peak_GiB"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        if small is not None:
            extra = seconds - row["extract_small_s"]
            row["steady_images_per_s"] = (plan.extract_images - plan.extract_small) / extra if extra > 0 else None
        du, apparent = disk_bytes(cache / "train")
        row.update(
            bytes_per_image=du / plan.extract_images,
            apparent_bytes_per_image=apparent / plan.extract_images,
            c1_bytes_per_image=disk_bytes(cache / "train" / "c1")[0] / plan.extract_images,
        )
        if amp == "off" and name.startswith("deformable_detr"):
            row.update(cache=str(cache), keep=True)  # section 5 trains from it
        else:
            shutil.rmtree(cache)
        results.append(row)
        run.log(
            f"  extraction: {name} amp={amp}: {row['extract_images_per_s']:.2f} images/s end to end"
            + (f", {row['steady_images_per_s']:.2f} steady" if row.get("steady_images_per_s") else "")
        )

    # the forward alone, on the same decoded images at the same batch size, AMP settings alternated
    start = time.perf_counter()
    model = load_detector(spec, device=run.device)
    load_s = time.perf_counter() - start
    order = [im["file_name"] for im in json.loads(annotations.read_text())["images"]]
    inputs = [to_input(load_image(data / "train" / f), model.info.preprocess) for f in order]
    batch = config.batch_size

    def forward(amp: str):
        @torch.no_grad()
        def all_images():
            for j in range(0, len(inputs), batch):
                run_detector(model, inputs[j : j + batch], device=run.device, amp=amp)
            run.sync()

        return all_images

    fns = {amp: forward(amp) for amp in AMPS if not run.over_budget()}
    times = interleaved(fns, plan.forward_repeats) if fns else {}
    extra = {}
    if run.cuda and not run.quick and not run.over_budget():  # does a larger batch pay?
        batch8 = 8

        @torch.no_grad()
        def eight():
            for j in range(0, len(inputs), batch8):
                run_detector(model, inputs[j : j + batch8], device=run.device, amp="off")
            run.sync()

        extra["forward_images_per_s_batch8_amp_off"] = len(inputs) / interleaved({"b8": eight}, 1)["b8"]
    for row in results:
        if row["amp"] not in times:
            continue
        per_image = times[row["amp"]] / len(inputs)
        row.update(forward_images_per_s=1 / per_image, model_load_s=load_s)
        steady = row.get("steady_images_per_s")
        extract_per_image = 1 / steady if steady else row["extract_s"] / plan.extract_images
        row["extract_over_forward"] = extract_per_image / per_image
        row["ratio_basis"] = "steady state" if steady else "end to end (model load included)"
        row.update(extra if row["amp"] == "off" else {})
    return results


# ----------------------------------------------------------------------------- 5. training
def section_training(run: Run) -> dict:
    """Per head and AMP: a warm-up run of a few steps (untimed), then the same run resumed for
    ``steps`` more, timed by train() (the DataLoader's start included); peak GPU memory of the
    timed part; and the reader alone over the same batches (CacheDataset + DataLoader, same
    workers and pinning as training), per head's inputs."""
    from mfcache.cache.reader import Cache
    from mfcache.config import resolve_run_config
    from mfcache.stages.runs import head_for

    cache_path = run.results.get("_train_cache")
    if not cache_path:
        raise RuntimeError("section extraction left no Deformable DETR cache (amp off) to train from")
    plan = run.plan
    cache = Cache(cache_path)
    images = cache.split("train").num_rows
    batch = min(8, images)
    min_iou, positives = positives_threshold(cache, plan.positives)
    run.min_iou = min_iou
    page_cached = " (page-cached: a train2017 cache is read from disk)" if run.cuda else ""
    out = {
        "cache": f"{cache.detector.family} d={cache.detector.d_model}, C1 {cache.detector.c1_channels} ch stored, "
        f"top-{cache.settings.topk}, {images} images{page_cached}",
        "batch": batch,
        "steps": plan.steps,
        "warmup_steps": plan.warmup_steps,
        "workers": plan.train_workers,
        "min_iou": min_iou,
        "positives_per_image": positives,
        "positives_note": f"random-weight detector: train.min_iou chosen aiming at {plan.positives} training "
        "queries/image (head compute grows with them; a chosen figure, not measured on COCO)",
        "settings": [],
        "readers": {},
    }
    for name in HEADS:
        head = head_for(cache.detector, cache.settings, resolve_run_config(name).head)
        key = f"levels {','.join(map(str, head.levels))}" + (" + C1" if head.uses_c1 else "")
        if key not in out["readers"] and not run.over_budget():
            run.log(f"  training: reader alone ({key})")
            out["readers"][key] = _time_reader(run, Path(cache_path), head, batch)
        reader = out["readers"].get(key)
        for amp in AMPS:
            if run.over_budget():
                out["settings"].append({"head": name, "amp": amp, **over_budget_note(run)})
                continue
            try:
                row = _time_training(run, Path(cache_path), name, amp, batch)
            except Exception as exc:  # the next setting still runs
                row = {"head": name, "amp": amp, "error": f"{type(exc).__name__}: {exc}"}
            if reader and "images_per_s" in row:
                row["reader"] = key
                row["reader_images_per_s"] = reader["images_per_s"]
                row["reader_over_train"] = reader["images_per_s"] / row["images_per_s"]
                row["bound"] = "reader-bound" if row["reader_over_train"] < READER_MARGIN else "compute-bound"
            out["settings"].append(row)
            run.log(
                f"  training: {name} amp={amp}: "
                + (f"{row['images_per_s']:.1f} images/s" if "images_per_s" in row else row.get("error", ""))
            )
            run.free()
    return out


def _overrides(run: Run, amp: str, batch: int, steps: int) -> list[str]:
    return [
        f"train.steps={steps}",
        f"train.min_iou={run.min_iou}",
        f"train.batch_size={batch}",
        f"train.amp={amp}",
        f"train.device={run.device}",
        f"train.num_workers={run.plan.train_workers}",
        "train.checkpoint_every=1000000",
        "train.log_every=1000000",
    ]


def _time_training(run: Run, cache: Path, name: str, amp: str, batch: int) -> dict:
    from mfcache.config import resolve_run_config
    from mfcache.stages.train import train

    plan = run.plan
    run_dir = run.work / "train" / f"{name}-{amp}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(
        cache_path=cache,
        run_dir=run_dir,
        progress=False,
        config=resolve_run_config(name, _overrides(run, amp, batch, plan.warmup_steps)),
    )
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    total = plan.warmup_steps + plan.steps
    result = train(
        cache_path=cache,
        run_dir=run_dir,
        progress=False,
        resume=True,
        config=resolve_run_config(name, _overrides(run, amp, batch, total)),
    )
    row = {
        "head": name,
        "amp": amp,
        "batch": batch,
        "steps": plan.steps,
        "seconds": result["seconds"],
        "images_per_s": plan.steps * batch / result["seconds"],
        "s_per_step": result["seconds"] / plan.steps,
        "last_loss": result.get("loss"),
        "positives_last_step": result.get("positives"),
    }
    if run.cuda:
        row["peak_GiB"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def _time_reader(run: Run, cache: Path, head, batch: int) -> dict:
    from torch.utils.data import DataLoader

    from mfcache.cache.reader import CacheDataset
    from mfcache.cache.sample import Batch
    from mfcache.stages.sampling import StepBatches

    plan = run.plan
    dataset = CacheDataset(cache, "train", levels=head.levels, c1=head.uses_c1, targets=True)
    start_step = plan.warmup_steps
    batches = StepBatches(len(dataset), batch, 0, start_step, start_step + plan.steps)
    start = time.perf_counter()
    served = 0
    for b in DataLoader(
        dataset, batch_sampler=batches, collate_fn=Batch.collate, num_workers=plan.train_workers, pin_memory=run.cuda
    ):
        served += len(b)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": served, "images_per_s": served / seconds}


# ----------------------------------------------------------------------------- 6. projection
def section_projection(run: Run) -> dict:
    """COCO train2017 (118,287 images) on one such device, from sections 4 and 5: extraction
    hours per detector and AMP (steady-state rate where measured), head-training hours of the
    paper's schedule (88,500 steps of batch 8) per head and AMP (from s/step at this batch),
    cache TB from bytes per image."""
    extraction = run.results.get("extraction", {}).get("settings", [])
    training = run.results.get("training", {}).get("settings", [])
    if not any("extract_s" in s for s in extraction) and not any("seconds" in s for s in training):
        raise RuntimeError("nothing to project: sections extraction and training left no figures")
    out: dict = {
        "images": COCO_TRAIN2017_IMAGES,
        "schedule": f"{PAPER_STEPS:,} steps x batch {PAPER_BATCH}",
        "extraction": [],
        "training": [],
        "storage": [],
    }
    if run.quick:
        out["note"] = "--quick: projected from shrunk runs, not representative"
    for s in extraction:
        if "extract_s" not in s:
            continue
        rate = s.get("steady_images_per_s") or s["extract_images_per_s"]
        out["extraction"].append(
            {
                "detector": s["detector"],
                "amp": s["amp"],
                "images_per_s": rate,
                "basis": "steady state" if s.get("steady_images_per_s") else "end to end",
                "train2017_hours": COCO_TRAIN2017_IMAGES / rate / 3600,
            }
        )
        if s["amp"] == "off":
            auto = s["bytes_per_image"] - s.get("c1_bytes_per_image", 0)  # --c1 auto: recompute, no c1 array
            out["storage"].append(
                {
                    "detector": s["detector"],
                    "bytes_per_image": s["bytes_per_image"],
                    "train2017_TB": s["bytes_per_image"] * COCO_TRAIN2017_IMAGES / 1e12,
                    "auto_bytes_per_image": auto,
                    "train2017_TB_auto": auto * COCO_TRAIN2017_IMAGES / 1e12,
                }
            )
    for s in training:
        if "seconds" not in s:
            continue
        per_step = s["s_per_step"] * PAPER_BATCH / s["batch"]  # measured at a smaller batch only with few images
        out["training"].append(
            {
                "head": s["head"],
                "amp": s["amp"],
                "s_per_step": per_step,
                "paper_schedule_hours": PAPER_STEPS * per_step / 3600,
                "bound": s.get("bound", ""),
            }
        )
    return out


# ----------------------------------------------------------------------------- tables
def md_environment(r: dict) -> list[str]:
    keys = (
        "device_name",
        "driver",
        "nvidia_smi",
        "capability",
        "gpu_memory_GiB",
        "torch",
        "torchvision",
        "cuda",
        "cudnn",
        "cpu",
        "cpu_count",
        "torch_threads",
        "tf32_matmul",
        "tf32_cudnn",
        "python",
    )
    return ["| item | value |", "|---|---|"] + [f"| {k} | {fmt(r[k])} |" for k in keys if k in r]


def md_agreement(r: dict) -> list[str]:
    rows = [
        "| CPU vs CUDA | max abs | relative (max abs / max \\|cpu\\|) | tolerance | result | note |",
        "|---|---:|---:|---:|---|---|",
    ]
    for i in r["items"]:
        if "error" in i:
            rows.append(f"| {i['item']} | | | | **ERROR** | {i['error']} |")
        else:
            rows.append(
                f"| {i['item']} | {i['max_abs']:.3g} | {i['rel']:.3g} | {i['tolerance']:g} | "
                f"{'pass' if i['pass'] else '**FAIL**'} | {i.get('note', '')} |"
            )
    rows.append(
        f"\n{r['passed']} passed, {r['failed']} failed (TF32: cuDNN {r['tf32_cudnn']}, matmul {r['tf32_matmul']})"
    )
    return rows


def md_demo(r: dict) -> list[str]:
    check = r.get("check") or (f"{'pass' if r['pass'] else '**FAIL**'}: CPU {r['cpu_segm_AP']:.3f} ± {r['tolerance']}")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["stage_seconds"].items())
    return [
        "| demo on the device | value | check |",
        "|---|---:|---|",
        f"| wall time ({r['settings']}) | {r['seconds']:.1f} s | {stages} |",
        f"| segm AP | {r['segm_AP']:.3f} | {check} |",
        f"| bbox AP | {r['bbox_AP']:.3f} | |",
    ]


def md_extraction(r: dict) -> list[str]:
    rows = [
        f"{r['setup']}; {r['images']} images ({r['image_sizes']}), batch {r['batch']}, {r['workers']} workers"
        + (f"; steady state from {r['steady_state_from']}" if r.get("steady_state_from") else "")
        + "\n",
        "| detector | AMP | extract img/s (end to end) | extract img/s (steady) | forward img/s | "
        "extract ÷ forward | MiB/image | peak GPU GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["settings"]:
        if "extract_s" not in s:
            rows.append(f"| {s['detector']} | {s.get('amp', '')} | {s.get('error') or s.get('skipped')} | | | | | |")
            continue
        rows.append(
            f"| {s['detector']} | {s['amp']} | {s['extract_images_per_s']:.2f} | "
            f"{fmt(s.get('steady_images_per_s'))} | {fmt(s.get('forward_images_per_s'))} | "
            f"{fmt(s.get('extract_over_forward'))}x | {s['bytes_per_image'] / 2**20:.2f} | "
            f"{fmt(s.get('extract_peak_GiB'))} |"
        )
        if "forward_images_per_s_batch8_amp_off" in s:
            rows.append(
                f"| {s['detector']} forward at batch 8 | off | | | "
                f"{s['forward_images_per_s_batch8_amp_off']:.2f} | | | |"
            )
    return rows


def md_training(r: dict) -> list[str]:
    rows = [
        f"cache: {r['cache']}; batch {r['batch']}, {r['steps']} timed steps after {r['warmup_steps']} warm-up, "
        f"{r['workers']} reader workers; train.min_iou {r['min_iou']:g}: {r['positives_per_image']:.1f} training "
        f"queries per image ({r['positives_note']})\n",
        "| head | AMP | train img/s | s/step | peak GPU GiB | reader alone img/s | reader ÷ train | bound |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in r["settings"]:
        if "images_per_s" not in s:
            rows.append(f"| {s['head']} | {s['amp']} | {s.get('error') or s.get('skipped')} | | | | | |")
            continue
        rows.append(
            f"| {s['head']} | {s['amp']} | {s['images_per_s']:.1f} | {s['s_per_step']:.3f} | "
            f"{fmt(s.get('peak_GiB'))} | {fmt(s.get('reader_images_per_s'))} | "
            f"{fmt(s.get('reader_over_train'))}x | {s.get('bound', '')} |"
        )
    return rows


def md_sweep(r: dict) -> list[str]:
    rows = [
        r["settings"] + "\n",
        "| head | segm AP | AP50 | params | train s | s/step | x blendmask |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for h in r["heads"]:
        if "segm_AP" not in h:
            rows.append(f"| {h['head']} | {h.get('error') or h.get('skipped')} | | | | | |")
            continue
        rows.append(
            f"| {h['head']} | {100 * h['segm_AP']:.1f} | {100 * h['segm_AP50']:.1f} | {h['params']:,} | "
            f"{h['train_seconds']:.0f} | {h['s_per_step']:.3f} | {fmt(h.get('over_blendmask'))} |"
        )
    return rows


def md_projection(r: dict) -> list[str]:
    rows = ([f"**{r['note']}**\n"] if r.get("note") else []) + [
        f"COCO train2017: {r['images']:,} images; head schedule {r['schedule']}\n",
        "| projection | setting | figure |",
        "|---|---|---:|",
    ]
    for s in r["extraction"]:
        rows.append(
            f"| extraction, one device | {s['detector']} AMP {s['amp']} ({s['basis']}) | {s['train2017_hours']:.1f} h |"
        )
    for s in r["training"]:
        rows.append(
            f"| head training, paper schedule | {s['head']} AMP {s['amp']} ({s['bound'] or 'bound unknown'}) | "
            f"{s['paper_schedule_hours']:.1f} h |"
        )
    for s in r["storage"]:
        rows.append(f"| cache size (float16, C1 stored, top-100) | {s['detector']} | {s['train2017_TB']:.2f} TB |")
        if "train2017_TB_auto" in s:
            rows.append(
                f"| cache size (float16, --c1 auto: C1 recomputed, top-100) | {s['detector']} | "
                f"{s['train2017_TB_auto']:.2f} TB |"
            )
    return rows


SECTIONS = {
    "environment": (section_environment, md_environment),
    "agreement": (section_agreement, md_agreement),
    "demo": (section_demo, md_demo),
    "extraction": (section_extraction, md_extraction),
    "training": (section_training, md_training),
    "projection": (section_projection, md_projection),
    "sweep": (section_sweep, md_sweep),
}
DEFAULT_SECTIONS = [name for name in SECTIONS if name != "sweep"]  # the sweep runs only when asked


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# mfcache GPU check ({meta['device']}{', --quick' if meta['quick'] else ''})\n",
        f"{meta['started']}, {meta['elapsed_s']:.0f} s" + ("" if meta.get("finished") else " (unfinished)") + "\n",
    ]
    for name, (_, table) in SECTIONS.items():
        if name not in results:
            continue
        r = results[name]
        lines.append(f"## {name} ({r.get('seconds', 0):.0f} s)\n")
        if "error" in r:
            lines.append(f"**ERROR**: {r['error']}\n")
        elif "skipped" in r:
            lines.append(f"skipped: {r['skipped']}\n")
        else:
            try:
                lines += table(r) + [""]
            except Exception as exc:  # a table that cannot be drawn must not lose the JSON
                lines.append(f"(table failed: {type(exc).__name__}: {exc})\n")
    return "\n".join(lines)


def save(run: Run) -> str:
    run.results["meta"]["elapsed_s"] = run.elapsed()
    return write_report(run.out, "gpu", run.results, markdown(run.results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="shrunk runs (on a CPU: tiny detectors, 64 px)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="past this many seconds, what remains is recorded as skipped (default 480)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: up to 8; 1 with --device cpu --quick, a check that "
        "shares its cores with its own reader processes)",
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never wait on one
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")  # (set before transformers is first imported)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" and args.quick else min(8, os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="gpucheck-", dir=args.work))
    run = Run(
        device=device,
        quick=args.quick,
        out=args.out,
        work=work,
        budget_s=args.budget_s,
        plan=Plan.make(device, args.quick),
    )
    run.results["meta"] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device,
        "quick": args.quick,
        "started": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        "threads": args.threads,
        "budget_s": args.budget_s,
        "plan": dataclasses.asdict(run.plan),
        "elapsed_s": 0.0,
    }
    if device.type == "cuda" and not torch.cuda.is_available():
        run.log("no CUDA device is available: use --device cpu")
    try:
        for name in args.only or DEFAULT_SECTIONS:
            fn, _ = SECTIONS[name]
            if name != "projection" and run.over_budget():
                result = over_budget_note(run)
            else:
                run.log(f"section {name} ...")
                start = time.perf_counter()
                try:
                    result = fn(run)
                except Exception as exc:  # a GPU lease is precious: record the failure and go on
                    traceback.print_exc()
                    result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-4)}
                result["seconds"] = time.perf_counter() - start
                run.log(
                    f"section {name}: {'ERROR ' + result['error'] if 'error' in result else 'done'} "
                    f"in {result['seconds']:.1f} s"
                )
            run.results[name] = result
            run.free()
            save(run)
        run.results["meta"]["finished"] = True
    finally:
        table = save(run)
        shutil.rmtree(work, ignore_errors=True)
    print(table)


if __name__ == "__main__":
    main()
