"""The paper head's non-inherent costs, before and after, side by side in one process:

- RoIAlign of the fused map F (stride 4, 256 channels, M = 32, sampling ratio 2) by the dense
  matmul path (``method="dense"``, what every map took before) and torchvision's
  (``method="torchvision"``), forward alone (inference: 100 boxes of one image) and forward +
  backward (training: 20 boxes per image), at F's size for several input sizes up to the
  paper's 800x1067 (a 480x640 COCO image at the 800/1333 resize): where the two cross is
  what ``mfcache.heads.roi.DENSE_MAX_PIXELS`` is set from. ``auto`` is the path the heads now take.
- The deformable image encoder (``paper_final``'s: depth 2, 4 levels x 256) at the paper's
  size, forward returning every level (before) against computing only the level F keeps
  (``output_level=0``, after: the last block skips the other levels' tokens).
- A whole ``paper_final`` training step at the paper's size, both changes off (before) and on.

Each pair is timed alternately (:func:`common.interleaved`: a warm-up each, then the median of
the repeats), so load from other processes affects both sides alike: read the ratios.

    OMP_NUM_THREADS=2 python benchmarks/roi_align_speed.py --out benchmarks/results/roi_align_speed
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, interleaved, write_report  # noqa: E402

CHANNELS, M, STRIDE = 256, 32, 4
INPUTS = [(256, 341), (384, 512), (512, 683), (800, 1067)]  # input (h, w); F is a quarter of it


def boxes_in(hw: tuple[int, int], n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 5]`` RoIs of image 0: random boxes of 1/16 .. 3/4 of the image's sides."""
    h, w = hw
    size = torch.tensor([w, h], dtype=torch.float32)
    wh = (0.06 + torch.rand(n, 2, generator=gen) * 0.7) * size
    lo = torch.rand(n, 2, generator=gen) * (size - wh)
    return torch.cat([torch.zeros(n, 1), lo, lo + wh], 1)


def roi_calls(hw: tuple[int, int], n: int, backward: bool, method: str):
    """A call: RoIAlign of ``n`` boxes on F of an ``hw`` input by ``method`` (and its backward)."""
    from mfcache.heads.roi import roi_align

    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(CHANNELS, -(-hw[0] // STRIDE), -(-hw[1] // STRIDE), generator=gen, requires_grad=backward)
    rois = boxes_in(hw, n, gen)

    def run() -> None:
        if backward:
            out = roi_align([fmap], rois, M, 1.0 / STRIDE, 2, method=method)
            out.sum().backward()
            fmap.grad = None
        else:
            with torch.no_grad():
                roi_align([fmap], rois, M, 1.0 / STRIDE, 2, method=method)

    return run


def encoder_calls(hw: tuple[int, int], keep_only: bool):
    """A call: ``paper_final``'s deformable encoder (depth 2, 4 levels) on one image's levels
    at ``hw``, all levels out (before) or level 0 only (after)."""
    from mfcache.heads.deformable import DeformableEncoder

    torch.manual_seed(0)
    encoder = DeformableEncoder(dim=CHANNELS, num_levels=4, depth=2, activation="gelu").eval()
    levels = [torch.randn(1, CHANNELS, -(-hw[0] // (8 << l)), -(-hw[1] // (8 << l))) for l in range(4)]

    @torch.no_grad()
    def run() -> None:
        encoder(levels, output_level=0) if keep_only else encoder(levels)[0]

    return run


class AllLevels(torch.nn.Module):
    """The deformable encoder as it was: every level refined, then the kept one picked."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, levels, output_level=None):
        return self.encoder(levels)[output_level]


def head_step(hw: tuple[int, int], before: bool):
    """A call: one training step (forward, loss, backward) of ``paper_final`` on one image at
    ``hw`` (H-DETR R50's layout: 4 levels x 256, C1 256 channels, 100 queries, 20 trained),
    as it ran before (dense RoIAlign on every map, every encoder level) or now."""
    import mfcache.heads.roi as roi
    from mfcache.config import TrainConfig, resolve_run_config
    from mfcache.heads import build_head
    from mfcache.ops.losses import head_loss

    torch.manual_seed(0)
    config = resolve_run_config("paper_final").head
    head = build_head(config, d_model=CHANNELS, c1_channels=CHANNELS, num_levels=4).train()
    if before:
        head.fusion.encoder = AllLevels(head.fusion.encoder)
    h, w = hw
    levels = [torch.randn(1, CHANNELS, -(-h // (8 << l)), -(-w // (8 << l))) for l in range(4)]
    c1 = torch.randn(1, CHANNELS, -(-h // 4), -(-w // 4))
    gen = torch.Generator().manual_seed(0)
    boxes = boxes_in(hw, 100, gen)[None, :, 1:]
    queries = torch.randn(1, 100, CHANNELS)
    select = torch.zeros(1, 100, dtype=torch.bool)
    select[0, :20] = True
    targets = torch.rand(20, 64, 64) > 0.5

    def run() -> None:
        limit = roi.DENSE_MAX_PIXELS
        roi.DENSE_MAX_PIXELS = 1 << 62 if before else limit  # before: the dense path on every map
        try:
            out = head(queries, boxes, levels, c1, select)
            loss, _ = head_loss(out, targets, config, TrainConfig())
            loss.backward()
            head.zero_grad(set_to_none=True)
        finally:
            roi.DENSE_MAX_PIXELS = limit

    return run


def measure(repeats: int) -> dict:
    from mfcache.heads.roi import DENSE_MAX_PIXELS, roi_method

    rows = []
    for hw in INPUTS:
        fh, fw = -(-hw[0] // STRIDE), -(-hw[1] // STRIDE)
        for what, n, backward in (("forward, 100 boxes", 100, False), ("forward + backward, 20 boxes", 20, True)):
            t = interleaved({m: roi_calls(hw, n, backward, m) for m in ("dense", "torchvision")}, repeats)
            rows.append(
                {
                    "input_hw": hw,
                    "map_hw": (fh, fw),
                    "what": what,
                    "dense_s": t["dense"],
                    "torchvision_s": t["torchvision"],
                    "dense_over_torchvision": t["dense"] / t["torchvision"],
                    "auto": roi_method(fh, fw),
                }
            )
            print(rows[-1], flush=True)
    calls = {"all_levels": encoder_calls(INPUTS[-1], False), "kept_level": encoder_calls(INPUTS[-1], True)}
    flops = {}
    for name, call in calls.items():  # the matmul work (linear layers), machine-independent
        with FlopCounterMode(display=False) as counter:
            call()
        flops[name] = counter.get_total_flops() / 1e9
    enc = interleaved(calls, repeats)
    step = interleaved({"before": head_step(INPUTS[-1], True), "after": head_step(INPUTS[-1], False)}, repeats)
    return {
        "roi_align": rows,
        "dense_max_pixels": DENSE_MAX_PIXELS,
        "paper_final_train_step_paper_size": {
            "input_hw": INPUTS[-1],
            "before_s": step["before"],
            "after_s": step["after"],
            "speedup": step["before"] / step["after"],
        },
        "deformable_encoder_paper_size": {
            "input_hw": INPUTS[-1],
            "all_levels_s": enc["all_levels"],
            "kept_level_s": enc["kept_level"],
            "saved": 1 - enc["kept_level"] / enc["all_levels"],
            "all_levels_matmul_gflop": flops["all_levels"],
            "kept_level_matmul_gflop": flops["kept_level"],
            "matmul_saved": 1 - flops["kept_level"] / flops["all_levels"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        **measure(args.repeats),
        "load_average_at_end": os.getloadavg(),
    }
    lines = [
        "| input (F) | RoIAlign | dense (before) s | torchvision s | dense / torchvision | auto takes |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['input_hw'][0]}x{r['input_hw'][1]} ({r['map_hw'][0]}x{r['map_hw'][1]}) | {r['what']} | "
        f"{r['dense_s']:.3f} | {r['torchvision_s']:.3f} | {r['dense_over_torchvision']:.1f}x | {r['auto']} |"
        for r in results["roi_align"]
    ]
    e = results["deformable_encoder_paper_size"]
    lines += [
        "",
        "| deformable encoder (depth 2, 4 levels x 256) at 800x1067 | s | matmul GFLOP |",
        "|---|---:|---:|",
        f"| every level computed (before) | {e['all_levels_s']:.3f} | {e['all_levels_matmul_gflop']:.1f} |",
        f"| the last block on the kept level only (after) | {e['kept_level_s']:.3f} | "
        f"{e['kept_level_matmul_gflop']:.1f} |",
        f"| saved | {100 * e['saved']:.0f}% | {100 * e['matmul_saved']:.0f}% |",
        "",
    ]
    p = results["paper_final_train_step_paper_size"]
    lines += [
        "| paper_final training step, 1 image at 800x1067, 20 trained queries | s |",
        "|---|---:|",
        f"| before (dense RoIAlign, every encoder level) | {p['before_s']:.2f} |",
        f"| after | {p['after_s']:.2f} |",
        f"| speed-up | {p['speedup']:.2f}x |",
        "",
        f"{results['date']}, {results['cpu']}, {results['threads']} threads, load average at start "
        f"{results['load_average_at_start'][0]:.1f}, at end {results['load_average_at_end'][0]:.1f}",
    ]
    print(write_report(args.out, "roi_align_speed", results, "\n".join(lines)))


if __name__ == "__main__":
    main()
