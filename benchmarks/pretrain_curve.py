"""Learning curve of a pre-training run on held-out measures, and checkpoint selection.

For each checkpoint of a run (``RUN/checkpoints/step_*.pt``, then ``last.pt``) and for two
references (the shipped model, a randomly initialised network of the same width), on the
known-transform pairs built from each packaged source's **held-out slab** (never in the
training data, see ``pretrain_data.py``):

* network-only mean Dice (``match_pair(..., refine_iters=0)``) against the Dice before,
* heatmap best-match median error in working voxels (multi-scale descriptors; the integer
  maximum, without the sub-voxel peak, so that rows cached by earlier rounds stay comparable),
* folding (% of working voxels with a non-positive Jacobian),
* on pairs that need no motion (each held-out volume with itself): the network's mean displacement
  (working voxels) and the labels' Dice with themselves through it.

Rows are appended to ``RUN/validation.jsonl`` (one per checkpoint, already evaluated ones are
skipped, so it can be rerun while the run goes on), the table is printed, and
``--plot`` draws the curve. The selected checkpoint is the one with the best mean Dice among
those whose folding stays under 0.5 %.

    python benchmarks/pretrain_curve.py /root/runs/known1 --plot Resources/pretrain_curve.png
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GVSLExtension"))
import heatmaps  # noqa: E402
import pretrain_data  # noqa: E402
from common import markdown_table  # noqa: E402
from gvsl.checkpoint import average_weights, load_model  # noqa: E402
from gvsl.match import default_checkpoint  # noqa: E402

FOLDING_LIMIT = 0.005


def checkpoint_step(path: Path) -> int:
    match = re.search(r"step_(\d+)\.pt$", path.name)
    if match:
        return int(match.group(1))
    return int(torch.load(path, map_location="cpu", weights_only=True).get("step", -1))


def aligned_motion(model, pairs) -> dict:
    """The network on pairs that need no motion, (A, A), one per held-out volume: the mean length
    of its displacement in working voxels and the Dice of A's labels with themselves through it
    (1.0 for a network that leaves an aligned pair alone)."""
    import SimpleITK as sitk
    seen, lengths, dices = set(), [], []
    for pair in pairs:
        key = pair.name.rsplit(" seed ", 1)[0]  # the seeds of one source share its fixed volume
        if key in seen:
            continue
        seen.add(key)
        result = heatmaps.network_only(pair.fixed, pair.fixed, model)
        spacing = result.metrics["working_grid"]["spacing_mm"]
        lengths.append(float(np.linalg.norm(sitk.GetArrayViewFromImage(result.displacement), axis=-1).mean()) / spacing)
        field = sitk.DisplacementFieldTransform(sitk.Cast(result.displacement, sitk.sitkVectorFloat64))
        dices.append(heatmaps.mean_dice(pair.fixed_labels, pair.fixed_labels, field, sorted(pair.label_names)))
    return {"aligned_motion_voxels": float(np.mean(lengths)), "aligned_dice": float(np.mean(dices))}


def score(model, pairs, queries: int) -> dict:
    records = [heatmaps.evaluate(pair, model.eval(), queries) for pair in pairs]
    return {"dice_before": float(np.mean([r["dice_before"] for r in records])),
            "dice_network": float(np.mean([r["dice_network"] for r in records])),
            "pairs_above_before": int(sum(r["dice_network"] > r["dice_before"] for r in records)),
            "pairs": len(records),
            "heatmap_median_voxels": float(np.median([r["integer"]["median_voxels"] for r in records])),
            "folding": float(np.mean([r["folding"] for r in records])),
            **aligned_motion(model, pairs),
            "per_pair": {r["pair"]: {"dice_before": r["dice_before"], "dice_network": r["dice_network"],
                                     "heatmap_median_voxels": r["integer"]["median_voxels"]} for r in records}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seeds", default="101,102,103",
                        help="validation transform seeds (3 seeds = 15 pairs: one seed, 5 pairs, was too noisy to select on)")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--every", type=int, default=1, help="evaluate every k-th periodic checkpoint")
    parser.add_argument("--average", type=int, default=0, metavar="K",
                        help="also evaluate, at each evaluated checkpoint, the weight average of it and the K-1 "
                             "periodic checkpoints before it (gvsl export A B ... OUT), as candidates too")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)

    pairs = pretrain_data.validation_pairs(seeds=tuple(int(s) for s in args.seeds.split(",")))
    out = args.run / "validation.jsonl"
    settings = {"seeds": args.seeds, "queries": args.queries}
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            # A row measured on other validation pairs (another --seeds) is not comparable: measure again.
            # Rows written before the settings were recorded are matched on their pair count.
            if row.get("settings", settings) == settings and row.get("pairs") == len(pairs):
                done[row["name"]] = row

    def record(name, step, model):
        if name in done:
            return done[name]
        row = {"name": name, "step": step, "settings": settings, **score(model, pairs, args.queries)}
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        done[name] = row
        print(f"{name}: Dice {row['dice_before']:.3f} -> {row['dice_network']:.3f} "
              f"({row['pairs_above_before']}/{row['pairs']} above before), heatmap {row['heatmap_median_voxels']:.2f} "
              f"voxels, folding {100 * row['folding']:.2f} %", flush=True)
        return row

    shipped = load_model(default_checkpoint())
    # Named by its content: rows are cached by name, and the shipped model changes between rounds.
    shipped_name = "shipped " + hashlib.sha256(default_checkpoint().read_bytes()).hexdigest()[:8]
    record(shipped_name, 0, shipped)
    every_periodic = sorted(args.run.glob("checkpoints/step_*.pt"), key=checkpoint_step)
    periodic = every_periodic[args.every - 1::args.every]
    for path in periodic:
        record(path.name, checkpoint_step(path), load_model(path))
    candidates = [done[p.name] for p in periodic]
    averaged = []
    if args.average > 1:
        with tempfile.TemporaryDirectory() as scratch:
            for path in periodic:
                end = every_periodic.index(path) + 1
                if end < args.average:
                    continue
                window = every_periodic[end - args.average:end]
                name = f"avg{args.average} {window[0].stem[5:].lstrip('0')}-{window[-1].stem[5:].lstrip('0')}"
                if name not in done:
                    average_weights(window, Path(scratch) / "average.pt")
                    record(name, checkpoint_step(path), load_model(Path(scratch) / "average.pt"))
                averaged.append(done[name])
    candidates = candidates + averaged
    # The random network uses the trained run's grid, so only the weights differ.
    trained = load_model(periodic[-1]) if periodic else shipped
    record("random init", 0, heatmaps.random_model(trained))

    header = ["checkpoint", "step", "mean Dice before → network", "pairs above before", "heatmap median voxels",
              "folding %", "aligned pairs: motion voxels / Dice"]

    def aligned(r):  # rows measured before this column existed have none
        return (f"{r['aligned_motion_voxels']:.2f} / {r['aligned_dice']:.3f}"
                if "aligned_motion_voxels" in r else "–")

    rows = [[r["name"], str(r["step"]), f"{r['dice_before']:.3f} → {r['dice_network']:.3f}",
             f"{r['pairs_above_before']}/{r['pairs']}", f"{r['heatmap_median_voxels']:.2f}", f"{100 * r['folding']:.2f}",
             aligned(r)]
            for r in [done[shipped_name], done["random init"]] + candidates]
    print(markdown_table(header, rows))
    eligible = [r for r in candidates if r["folding"] < FOLDING_LIMIT]
    if eligible:
        best = max(eligible, key=lambda r: r["dice_network"])
        print(f"selected: {best['name']} (step {best['step']})")

    plain = [c for c in candidates if c not in averaged]
    if args.plot and plain:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        steps = [r["step"] for r in plain]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
        left.plot(steps, [r["dice_network"] for r in plain], "o-", label="network alone")
        if averaged:
            left.plot([r["step"] for r in averaged], [r["dice_network"] for r in averaged], "s-",
                      label=f"average of {args.average} checkpoints")
        left.axhline(plain[0]["dice_before"], color="grey", ls="--", label="before")
        left.axhline(done[shipped_name]["dice_network"], color="tab:red", ls=":", label="old shipped model")
        left.set_xlabel("step")
        left.set_ylabel("mean Dice, held-out slabs")
        left.legend(fontsize=8)
        right.plot(steps, [r["heatmap_median_voxels"] for r in plain], "o-", label="trained")
        if averaged:
            right.plot([r["step"] for r in averaged], [r["heatmap_median_voxels"] for r in averaged], "s-",
                       label=f"average of {args.average}")
        right.axhline(done["random init"]["heatmap_median_voxels"], color="grey", ls="--", label="random init")
        right.axhline(done[shipped_name]["heatmap_median_voxels"], color="tab:red", ls=":", label="old shipped model")
        right.set_xlabel("step")
        right.set_ylabel("heatmap median error (voxels)")
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"curve: {args.plot}")


if __name__ == "__main__":
    main()
