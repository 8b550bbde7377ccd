"""run_all.py's ``peers`` section: the cost per image of mfcache's cached mask head against what
a user would run instead, all at the paper's input size (480x640 COCO-sized images -> 800x1067
at the 800/1333 resize) and random weights (the cost does not depend on them), timed
alternately in one process (:func:`common.interleaved`: one warm-up each, then the median of
the repeats), so load from other processes affects every side alike.

- ``maskrcnn_train_ratio``: a torchvision Mask R-CNN R50-FPN training step (batch 2, 7 GT
  instances per image) vs a training step of the paper's head (``paper_final``; also
  ``blendmask``) from the cache, batch 8 (``--quick``: 2), per image. Mask R-CNN is built as
  ``maskrcnn_resnet50_fpn`` builds it from an ImageNet backbone (frozen BatchNorm, stem and
  layer1 frozen), the recipe users train; ``weights=None`` alone would train every layer with
  live BatchNorm, which costs more.
- ``sam_mask_ratio``: SAM ViT-B (transformers ``SamModel(SamConfig())``, image encoder at 1024
  included) prompted with 100 boxes vs the paper's head forward on its 100 cached queries (cache
  read included), per image; both up to per-box mask logits (no paste).
- ``cache_payoff``: the paper's setting without a cache (the frozen H-DETR R50 run live on
  decoded images, then the same head step) vs from the cache; run_all.py files it under
  ``cache_payoff.paper_scale_ratio``.

The cache is :func:`cache_io.synthetic_cache` with H-DETR R50's layout (4 levels x 256, C1 256
channels, top-100) at 800x1067, 20 training queries per image on both training sides.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from cache_io import synthetic_cache
from common import PAPER_EDGES, interleaved, write_coco_sized_dataset, write_native_checkpoint

INPUT_HW = (800, 1067)  # a 480x640 image at the paper's resize
POSITIVES = 20  # training queries per image on every head-training side
MASKRCNN_BATCH = 2  # torchvision's reference recipe: 2 images per GPU
GT_PER_IMAGE = 7  # COCO train2017 averages 7.3 instances per image
PAPER_HEAD = "paper_final"


def _head_config(name: str, steps: int = 1, batch: int = 8):
    from mfcache.config import resolve_run_config

    return resolve_run_config(
        name,
        [
            f"train.steps={steps}",
            f"train.batch_size={batch}",
            "train.num_workers=0",
            "train.device=cpu",
            "train.checkpoint_every=1000000",
            "train.log_every=1000000",
        ],
    )


class CachedTraining:
    """Each call trains head ``name`` one more step of ``batch`` images from ``cache`` with
    ``mfcache.stages.train`` (the run is resumed: its checkpoint read and written once a call)."""

    def __init__(self, cache: Path, run_dir: Path, name: str, batch: int):
        self.cache, self.run_dir, self.name, self.batch, self.steps = cache, run_dir, name, batch, 0

    def __call__(self) -> None:
        from mfcache.stages.train import train

        self.steps += 1
        train(
            cache_path=self.cache,
            run_dir=self.run_dir,
            progress=False,
            resume=self.steps > 1,
            config=_head_config(self.name, self.steps, self.batch),
        )


def cached_forward(cache: Path, name: str, images: int):
    """A call: read ``images`` images from ``cache`` and run head ``name`` (eval) on their 100
    queries each, as evaluation does (:func:`mfcache.stages.postprocess.mask_probs`)."""
    from mfcache.cache.reader import Cache, CacheDataset
    from mfcache.cache.sample import Batch
    from mfcache.stages.postprocess import mask_probs
    from mfcache.stages.runs import head_for

    opened = Cache(cache)
    head = head_for(opened.detector, opened.settings, _head_config(name).head).eval()
    dataset = CacheDataset(cache, "train", levels=head.levels, c1=head.uses_c1, targets=False)

    @torch.no_grad()
    def run() -> None:
        mask_probs(head, Batch.collate([dataset[i] for i in range(images)]).to("cpu"))

    return run


def maskrcnn_step(hw=(480, 640)):
    """A call: one SGD step of torchvision's Mask R-CNN R50-FPN (91 classes, its own 800/1333
    resize) on 2 random images with 7 random box-shaped instances each."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    # what maskrcnn_resnet50_fpn builds for a pretrained backbone: FrozenBatchNorm, 3 trainable layers
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    model = MaskRCNN(backbone, num_classes=91, min_size=PAPER_EDGES[0], max_size=PAPER_EDGES[1]).train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9, weight_decay=1e-4
    )
    h, w = hw
    images = [torch.rand(3, h, w) for _ in range(MASKRCNN_BATCH)]
    targets = []
    for _ in images:
        xy = torch.rand(GT_PER_IMAGE, 2) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat([xy, xy + 32 + torch.rand(GT_PER_IMAGE, 2) * torch.tensor([w * 0.3, h * 0.3])], 1)
        masks = torch.zeros(GT_PER_IMAGE, h, w, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
            m[y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (GT_PER_IMAGE,)), "masks": masks})

    def step() -> None:
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return step


def sam_masks(boxes: int = 100):
    """A call: SAM ViT-B (random weights) on one 1024x1024 input prompted with ``boxes`` boxes,
    one mask each (``multimask_output=False``)."""
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    model = SamModel(SamConfig()).eval()
    pixels = torch.randn(1, 3, 1024, 1024)
    xy = torch.rand(1, boxes, 2) * 700
    prompts = torch.cat([xy, xy + 16 + torch.rand(1, boxes, 2) * 300], -1)

    @torch.no_grad()
    def run() -> None:
        model(pixel_values=pixels, input_boxes=prompts, multimask_output=False)

    return run


def live_step(tmp: Path, images: int):
    """A call: the frozen H-DETR R50 (random weights, 800/1333) on ``images`` decoded images, its
    outputs as the head would read them from a cache (:func:`mfcache.stages.predict.detect`),
    then one training step of the paper's head on 20 queries per image (random targets)."""
    from mfcache.cache.schema import ExtractSettings
    from mfcache.data.transforms import load_image
    from mfcache.detectors import load_detector
    from mfcache.ops.losses import head_loss
    from mfcache.stages.postprocess import run_head
    from mfcache.stages.predict import detect
    from mfcache.stages.runs import head_for

    spec = write_native_checkpoint(tmp / "hdetr", "hdetr", shortest_edge=PAPER_EDGES[0], longest_edge=PAPER_EDGES[1])
    annotations = write_coco_sized_dataset(tmp / "data", images=images)
    pixels = {i: load_image(path) for i, path in enumerate(sorted((annotations.parent.parent / "train").glob("*.png")))}
    model = load_detector(spec, device=torch.device("cpu"))
    settings = ExtractSettings(
        topk=100, target_size=64, c1="store", dtype="float16", levels=(0, 1, 2, 3), resize=model.info.preprocess.resize
    )
    config = _head_config(PAPER_HEAD)
    head = head_for(model.info, settings, config.head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.train.lr)

    def step() -> None:
        with torch.no_grad():
            batch = detect(model, pixels, extract=settings, head=head, device=torch.device("cpu")).to("cpu")
        select = torch.zeros(batch.scores.shape, dtype=torch.bool)
        select[:, :POSITIVES] = True
        out = run_head(head, batch, select)
        targets = (torch.rand(len(out.mask_logits), head.roi_size, head.roi_size) > 0.5).float()
        loss, _ = head_loss(out, targets, config.head, config.train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def bench_peers(quick: bool) -> dict:
    """Every side, alternately: one warm-up each, then 2 (``quick``) or 3 timed repeats. The
    cached head trains at the paper's batch 8 (``quick``: 2, the same cost per image on a CPU
    plus a larger share of the per-step costs) and runs forward on 2 images at a time
    (``paper_final`` on 8 x 100 queries at once needs over 20 GB: its box encoder's 800 RoIs)."""
    batch, live_images = (2, 1) if quick else (8, 2)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        cache = synthetic_cache(tmp / "cache", images=8, input_hw=INPUT_HW, positives=POSITIVES)
        sides = {
            "cache_train_paper_final": (CachedTraining(cache, tmp / "paper", PAPER_HEAD, batch), batch),
            "cache_train_blendmask": (CachedTraining(cache, tmp / "blend", "blendmask", batch), batch),
            "maskrcnn_train": (maskrcnn_step(), MASKRCNN_BATCH),
            "cache_forward_paper_final": (cached_forward(cache, PAPER_HEAD, 2), 2),
            "sam_vit_b_100_boxes": (sam_masks(), 1),
            "live_hdetr_paper_final": (live_step(tmp, live_images), live_images),
        }
        seconds = interleaved({name: fn for name, (fn, _) in sides.items()}, 2 if quick else 3)
    per_image = {name: seconds[name] / n for name, (_, n) in sides.items()}
    paper, blend = per_image["cache_train_paper_final"], per_image["cache_train_blendmask"]
    return {
        "setup": (
            f"480x640 images -> {INPUT_HW[0]}x{INPUT_HW[1]} inputs (800/1333 resize), random weights; cache: "
            f"H-DETR R50 layout (4 levels x 256, C1 256 ch stored, top-100, float16), {POSITIVES} training "
            f"queries/image; head batch {batch}; Mask R-CNN R50-FPN batch {MASKRCNN_BATCH}, "
            f"{GT_PER_IMAGE} GT/image; SAM ViT-B at 1024 with 100 boxes; live H-DETR R50 batch {live_images}"
        ),
        "s_per_image": per_image,
        "maskrcnn_train_ratio": per_image["maskrcnn_train"] / paper,
        "maskrcnn_train_ratio_blendmask": per_image["maskrcnn_train"] / blend,
        "sam_mask_ratio": per_image["sam_vit_b_100_boxes"] / per_image["cache_forward_paper_final"],
        "cache_payoff": {
            "paper_scale_ratio": per_image["live_hdetr_paper_final"] / paper,
            "paper_scale_live_s_per_image": per_image["live_hdetr_paper_final"],
            "paper_scale_cache_s_per_image": paper,
            "paper_scale_setup": f"H-DETR R50 at 800x1067, {PAPER_HEAD} head, {POSITIVES} "
            "training queries/image on both sides",
        },
    }


def bench_paper_ratios(quick: bool) -> dict:
    """The two peers ratios of the paper's head alone (``maskrcnn_train_ratio``,
    ``sam_mask_ratio``): its four sides of :func:`bench_peers` (no blendmask, no live H-DETR),
    alternately, one warm-up each, then 2 (``quick``) or 3 timed repeats. For re-measuring
    ``paper_final`` after a change to it in a fraction of the full section's time."""
    batch = 2 if quick else 8
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        cache = synthetic_cache(tmp / "cache", images=8, input_hw=INPUT_HW, positives=POSITIVES)
        sides = {
            "cache_train_paper_final": (CachedTraining(cache, tmp / "paper", PAPER_HEAD, batch), batch),
            "maskrcnn_train": (maskrcnn_step(), MASKRCNN_BATCH),
            "cache_forward_paper_final": (cached_forward(cache, PAPER_HEAD, 2), 2),
            "sam_vit_b_100_boxes": (sam_masks(), 1),
        }
        seconds = interleaved({name: fn for name, (fn, _) in sides.items()}, 2 if quick else 3)
    per_image = {name: seconds[name] / n for name, (_, n) in sides.items()}
    return {
        "setup": (
            f"480x640 images -> {INPUT_HW[0]}x{INPUT_HW[1]} inputs (800/1333 resize), random weights; cache: "
            f"H-DETR R50 layout (4 levels x 256, C1 256 ch stored, top-100, float16), {POSITIVES} training "
            f"queries/image; head {PAPER_HEAD} batch {batch}; Mask R-CNN R50-FPN batch {MASKRCNN_BATCH}, "
            f"{GT_PER_IMAGE} GT/image; SAM ViT-B at 1024 with 100 boxes"
        ),
        "s_per_image": per_image,
        "maskrcnn_train_ratio": per_image["maskrcnn_train"] / per_image["cache_train_paper_final"],
        "sam_mask_ratio": per_image["sam_vit_b_100_boxes"] / per_image["cache_forward_paper_final"],
    }


def main() -> None:
    """``python benchmarks/peers.py --out DIR [--quick]``: :func:`bench_paper_ratios` alone
    (run_all.py runs the whole section)."""
    import argparse
    import datetime
    import os

    from common import cpu_name, write_report

    parser = argparse.ArgumentParser(description=bench_paper_ratios.__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = os.getloadavg()
    r = bench_paper_ratios(args.quick)
    r.update(
        date=datetime.datetime.now().isoformat(timespec="minutes"),
        cpu=cpu_name(),
        threads=2,
        quick=args.quick,
        load_average_at_start=start,
        load_average_at_end=os.getloadavg(),
    )
    t = r["s_per_image"]
    table = "\n".join(
        [
            "| benchmark | measured | ratio |",
            "|---|---|---|",
            f"| peers.maskrcnn_train_ratio: training s/image, Mask R-CNN R50-FPN vs {PAPER_HEAD} from the cache "
            f"(800x1067) | {t['maskrcnn_train']:.2f} s vs {t['cache_train_paper_final']:.2f} s | "
            f"{r['maskrcnn_train_ratio']:.1f}x |",
            f"| peers.sam_mask_ratio: masks for 100 boxes, s/image, SAM ViT-B (image encoder included) vs {PAPER_HEAD} "
            f"from the cache | {t['sam_vit_b_100_boxes']:.2f} s vs {t['cache_forward_paper_final']:.2f} s | "
            f"{r['sam_mask_ratio']:.1f}x |",
            "",
            f"{r['date']}, {r['cpu']}, 2 threads, load average at start {start[0]:.1f}, at end "
            f"{r['load_average_at_end'][0]:.1f}; {r['setup']}",
        ]
    )
    print(write_report(args.out, "paper_ratios", r, table))


def rows(results: dict) -> list[str]:
    """Markdown rows of the peers section (and the paper-scale cache payoff)."""
    out = []
    if "peers" in results:
        r, t = results["peers"], results["peers"]["s_per_image"]
        out += [
            f"| peers.maskrcnn_train_ratio: training s/image, Mask R-CNN R50-FPN vs the paper's head from the "
            f"cache (800x1067) | {t['maskrcnn_train']:.2f} s vs {t['cache_train_paper_final']:.2f} s | "
            f"{r['maskrcnn_train_ratio']:.1f}x |",
            f"| the same vs the blendmask head | {t['maskrcnn_train']:.2f} s vs {t['cache_train_blendmask']:.2f} s "
            f"| {r['maskrcnn_train_ratio_blendmask']:.1f}x |",
            f"| peers.sam_mask_ratio: masks for 100 boxes, s/image, SAM ViT-B (image encoder included) vs the "
            f"paper's head from the cache | {t['sam_vit_b_100_boxes']:.2f} s vs "
            f"{t['cache_forward_paper_final']:.2f} s | {r['sam_mask_ratio']:.1f}x |",
        ]
    payoff = results.get("cache_payoff", {})
    if "paper_scale_ratio" in payoff:
        out.append(
            f"| cache_payoff.paper_scale_ratio: head training s/image, live frozen H-DETR R50 + head vs "
            f"the cache (800x1067, paper_final) | {payoff['paper_scale_live_s_per_image']:.2f} s vs "
            f"{payoff['paper_scale_cache_s_per_image']:.2f} s | {payoff['paper_scale_ratio']:.1f}x |"
        )
    return out


if __name__ == "__main__":
    main()
