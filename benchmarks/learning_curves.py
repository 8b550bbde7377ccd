"""Learning curves of trained runs, side by side: training loss and val segm AP against step.

Reads each run folder's ``log.jsonl`` (the loss every ``train.log_every`` steps; the val segm AP
at the steps a run validated, ``train.eval_every``) and writes ``OUT/learning_curves.json``,
``.md`` (the val AP at every validated step, one column per run) and ``.png`` (both curves).

    mfcache sweep --cache mfcache-demo/cache --steps 1500 --set train.lr=1e-3 \\
        --set train.eval_every=250 --heads box_baseline --out curves/none
    mfcache sweep ... --set head.fused_norm=group --out curves/group
    python benchmarks/learning_curves.py --run curves/none/box_baseline curves/group/box_baseline \\
        --label "F raw (paper)" "F GroupNorm" --out tmp/curves
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_report


def read_curves(run_dir: Path) -> dict:
    """``{"loss": [[step, loss], ...], "val_segm_AP": [[step, AP], ...]}`` from ``RUN/log.jsonl``."""
    loss, val = [], []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("loss") is not None:
            loss.append([entry["step"], entry["loss"]])
        segm = (entry.get("val") or {}).get("segm") or {}
        if segm.get("AP") is not None:
            val.append([entry["step"], segm["AP"]])
    return {"loss": loss, "val_segm_AP": val}


def plot(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, c in curves.items():
        if c["loss"]:
            left.plot(*zip(*c["loss"]), label=label)
        if c["val_segm_AP"]:
            right.plot(*zip(*[(s, 100 * ap) for s, ap in c["val_segm_AP"]]), marker="o", label=label)
    left.set(xlabel="step", ylabel="training loss (BCE + dice)", title="training loss")
    right.set(xlabel="step", ylabel="val segm AP (%)", title="val segm AP")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, nargs="+", required=True, help="run folders (each with log.jsonl)")
    parser.add_argument("--label", nargs="+", help="one label per run (default: the folder names)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.label or [str(r) for r in args.run]
    if len(labels) != len(args.run):
        parser.error("give one --label per --run")
    curves = {label: {"run": str(run), **read_curves(run)} for label, run in zip(labels, args.run)}
    steps = sorted({s for c in curves.values() for s, _ in c["val_segm_AP"]})
    rows = ["| step | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for step in steps:
        cells = [next((f"{100 * ap:.1f}" for s, ap in c["val_segm_AP"] if s == step), "-") for c in curves.values()]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curves, args.out / "learning_curves.png")
    print(write_report(args.out, "learning_curves", curves, "val segm AP (%)\n\n" + "\n".join(rows)))


if __name__ == "__main__":
    main()
