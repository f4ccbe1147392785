"""Heatmap accuracy (and network-only registration Dice) on every benchmark pair.

For each pair of ``datasets.benchmark_pairs`` (every packaged source under known random
affine + B-spline transforms, plus the cross-subject pair) and each model (the shipped model,
a randomly initialised model of the same width: the floor, and any ``--checkpoint``), one
network pass (``match_pair`` without refinement), then heatmap queries:

* known transform: 60 random points inside the fixed image's labels, truth = the transform;
* cross-subject: centroids of the same structure (each cut into 8 parts by its bounding box).

Columns: median / 90th-percentile distance (mm) between the best match and the true point,
the median in working-grid voxels (the best match refined to a fraction of a voxel, as the
product places it; "integer voxel": the same without that refinement), the median fraction of the searched grid within 0.05 of
the best similarity (1 = flat map), for the last decoder layer alone (the old heatmap) and
for the multi-scale descriptor (``gvsl.descriptors``); the mean Dice of the labels before
and after the network-only mapping.

    python benchmarks/heatmaps.py                          # all pairs, shipped vs random
    python benchmarks/heatmaps.py --checkpoint run/last.pt --validation   # held-out slabs only
Run heavy: ``flock /tmp/gvsl-heavy.lock nice -n 5 python benchmarks/heatmaps.py``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GVSLExtension"))
import datasets  # noqa: E402
from common import markdown_table  # noqa: E402
from gvsl.checkpoint import load_model  # noqa: E402
from gvsl.heatmap_eval import centroid_queries, foreground_queries, heatmap_accuracy  # noqa: E402
from gvsl.match import default_checkpoint, match_pair  # noqa: E402
from gvsl.metrics import dice_per_label  # noqa: E402
from gvsl.network import GVSL  # noqa: E402

LAST_LAYER = {"weights": (0, 0, 0, 0, 1), "window": 0}


def network_only(fixed, moving, model):
    kwargs = {"refine_iters": 0} if "refine_iters" in inspect.signature(match_pair).parameters else {}
    return match_pair(fixed, moving, model, device="cpu", **kwargs)


def mean_dice(moving_labels, fixed_labels, transform, label_ids):
    warped = sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0)
    d = dice_per_label(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(fixed_labels), label_ids)
    return float(np.nanmean(list(d.values())))


def evaluate(pair, model, queries: int = 60) -> dict:
    t0 = time.perf_counter()
    result = network_only(pair.fixed, pair.moving, model)
    seconds = time.perf_counter() - t0
    if pair.truth is not None:
        q, truth = foreground_queries(pair.fixed_labels, pair.truth, queries, seed=0)
    else:
        q, truth = centroid_queries(pair.fixed_labels, pair.moving_labels)
    t0 = time.perf_counter()
    multi = heatmap_accuracy(result, q, truth)
    ms_per_query = 1000 * (time.perf_counter() - t0) / len(q)
    last = heatmap_accuracy(result, q, truth, **LAST_LAYER)
    integer = heatmap_accuracy(result, q, truth, subvoxel=False)  # the best voxel without the sub-voxel peak
    ids = sorted(pair.label_names)
    field = sitk.DisplacementFieldTransform(sitk.Cast(result.displacement, sitk.sitkVectorFloat64))
    return {"pair": pair.name, "kind": pair.kind, "multi": multi, "last": last, "integer": integer,
            "ms_per_query": ms_per_query,
            "dice_before": mean_dice(pair.moving_labels, pair.fixed_labels, sitk.Transform(), ids),
            "dice_network": mean_dice(pair.moving_labels, pair.fixed_labels, field, ids),
            "folding": result.metrics["folding_fraction"], "network_seconds": seconds}


def random_model(like):
    torch.manual_seed(0)
    model = GVSL(width=like.width)
    # Same working grid as the shipped model: only the weights differ.
    model.checkpoint_meta = getattr(like, "checkpoint_meta", None)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="more models to compare (repeatable)")
    parser.add_argument("--no-shipped", action="store_true")
    parser.add_argument("--no-random", action="store_true")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--validation", action="store_true",
                        help="the held-out slabs of pretrain_data.py instead (model selection)")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--only", default=None, help="only pairs whose name contains this")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.validation:
        import pretrain_data
        pairs = pretrain_data.validation_pairs()
    else:
        pairs = datasets.benchmark_pairs(seeds=[int(s) for s in args.seeds.split(",")])
    if args.only:
        pairs = [p for p in pairs if args.only in p.name]
    shipped = load_model(default_checkpoint())
    models = []
    if not args.no_shipped:
        models.append(("shipped", shipped))
    if not args.no_random:
        models.append(("random init", random_model(shipped)))
    for path in args.checkpoint:
        models.append((Path(path).parent.parent.name if path.endswith("last.pt") else Path(path).name,
                       load_model(path)))

    rows, records = [], []
    for pair in pairs:
        for name, model in models:
            r = evaluate(pair, model.eval(), args.queries)
            r["model"] = name
            records.append(r)
            m, last = r["multi"], r["last"]
            rows.append([pair.name, name, f"{last['median_mm']:.1f} / {last['p90_mm']:.1f}", f"{last['peaked_fraction']:.3f}",
                         f"{m['median_mm']:.1f} / {m['p90_mm']:.1f}", f"{m['median_voxels']:.2f}",
                         f"{r['integer']['median_voxels']:.2f}", f"{m['peaked_fraction']:.3f}", f"{r['ms_per_query']:.0f}",
                         f"{r['dice_before']:.3f} → {r['dice_network']:.3f}", f"{100 * r['folding']:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["pair", "model", "last layer: median / p90 mm", "last layer: peaked", "multi-scale: median / p90 mm",
              "multi-scale: median voxels", "integer voxel: median voxels", "multi-scale: peaked", "ms / query", "mean Dice before → network",
              "folding %"]
    summary = []
    for name, _ in models:
        mine = [r for r in records if r["model"] == name]
        summary.append([f"**median over {len(mine)} pairs**", name,
                        f"{np.median([r['last']['median_mm'] for r in mine]):.1f}", "",
                        f"{np.median([r['multi']['median_mm'] for r in mine]):.1f}",
                        f"{np.median([r['multi']['median_voxels'] for r in mine]):.2f}",
                        f"{np.median([r['integer']['median_voxels'] for r in mine]):.2f}",
                        f"{np.median([r['multi']['peaked_fraction'] for r in mine]):.3f}", "",
                        f"{np.mean([r['dice_network'] for r in mine]):.3f} (mean)", ""])
    print()
    print(f"Heatmap best-match error ({len(pairs)} pairs, {'held-out slabs' if args.validation else 'benchmark pairs'}; "
          f"working grid = the model's, 'peaked' = fraction of the grid within 0.05 of the best similarity)")
    print(markdown_table(header, rows + summary))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2, default=float), encoding="utf-8")


if __name__ == "__main__":
    main()
