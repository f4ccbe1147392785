"""``gvsl demo``: Match pair on bundled data with a known answer.

The fixed image is a copy of the sample volume deformed by a known random affine +
elastic transform T_true, the moving image is the original: T_true maps every fixed
point to its true moving point, so landmark errors and label Dice are exact.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk

from .conventions import Grid
from .metrics import dice_per_label

HEATMAP_QUERIES = 60  # points whose heatmap best match is checked against the known transform


def label_centroids(labels: sitk.Image) -> Dict[int, np.ndarray]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    return {int(k): np.asarray(stats.GetCentroid(k)) for k in stats.GetLabels()}


def foreground_points(labels: sitk.Image, count: int, seed: int) -> np.ndarray:
    """Random LPS points inside labelled structures."""
    array = sitk.GetArrayViewFromImage(labels)
    voxels = np.argwhere(array > 0)
    rng = np.random.default_rng(seed)
    chosen = voxels[rng.choice(len(voxels), size=min(count, len(voxels)), replace=False)]
    grid = Grid.of(labels)
    m = grid.voxel_to_physical()
    return chosen.astype(np.float64) @ m[:3, :3].T + m[:3, 3]


def run_demo(out="gvsl-demo", checkpoint=None, device="auto", sample="ct", seed=7, quiet=False,
             refine_iters=None, similarity="lncc", time_budget_s=None, refine_tolerance=None,
             refine_detail=None) -> dict:
    from .match import match_pair
    from .samples import chest_ct, deformed_copy, mni_t1, random_deformation

    say = (lambda *a: None) if quiet else print
    t0 = time.perf_counter()
    if sample == "ct":
        image, labels, names = chest_ct()
        background, preset = -1024.0, "ct"
    else:
        image, labels, names = mni_t1()
        background, preset = 0.0, "mr"
    truth = random_deformation(image, seed=seed)
    fixed, fixed_labels = deformed_copy(image, labels, truth, background)
    moving, moving_labels = image, labels
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(fixed, str(out / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(out / "moving.nii.gz"))
    sitk.WriteImage(fixed_labels, str(out / "fixed_labels.nii.gz"))

    say(f"GVSL demo: matching the sample {'chest CT (slicerio CTChest4)' if sample == 'ct' else 'MNI152 T1'} "
        f"against a copy deformed by a known random affine + elastic transform (seed {seed})")
    result = match_pair(fixed, moving, checkpoint, device=device, preset=preset, refine_iters=refine_iters,
                        similarity=similarity, time_budget_s=time_budget_s, refine_tolerance=refine_tolerance,
                        refine_detail=refine_detail)

    centroids = label_centroids(fixed_labels)
    queries = [{"point": centroids[k].tolist(), "image": "fixed"} for k in sorted(centroids)[:2]]
    files = result.save(out, queries)

    points = foreground_points(fixed_labels, 500, seed)
    true_moving = np.array([truth.TransformPoint(p.tolist()) for p in points])
    from .heatmap_eval import heatmap_accuracy
    heat_points = foreground_points(fixed_labels, HEATMAP_QUERIES, seed + 1)
    heat = heatmap_accuracy(result, heat_points, np.array([truth.TransformPoint(p.tolist()) for p in heat_points]))

    label_ids = list(range(1, len(names) + 1))
    fixed_label_array = sitk.GetArrayFromImage(fixed_labels)

    def dice_through(transform: sitk.Transform) -> Dict[int, float]:
        warped = sitk.Resample(moving_labels, fixed, transform, sitk.sitkNearestNeighbor, 0)
        return dice_per_label(sitk.GetArrayFromImage(warped), fixed_label_array, label_ids)

    def field_transform(image: sitk.Image) -> sitk.Transform:
        return sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))

    errors = {"before": np.linalg.norm(points - true_moving, axis=1),
              "affine": np.linalg.norm(result.map_points(points, affine_only=True) - true_moving, axis=1),
              "network": np.linalg.norm(result.map_points(points, network=True) - true_moving, axis=1),
              "after": np.linalg.norm(result.map_points(points) - true_moving, axis=1)}
    dice = {"before": dice_through(sitk.Transform()), "after": dice_through(field_transform(result.displacement))}
    if result.network_mapping is result.mapping:
        dice["network"] = dice["after"]
    else:
        dice["network"] = dice_through(field_transform(sitk.ReadImage(files["network_displacement"])))
    warped_labels = sitk.Resample(moving_labels, fixed, field_transform(result.displacement), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(warped_labels, str(out / "warped_labels.nii.gz"))

    m = result.metrics
    summary = {
        "sample": sample, "seed": seed,
        "landmark_error_mm": {stage: _stats(e) for stage, e in errors.items()},
        "dice": {names[i - 1]: {stage: d[i] for stage, d in dice.items()} for i in label_ids},
        "mean_dice": {stage: float(np.nanmean(list(d.values()))) for stage, d in dice.items()},
        "local_ncc": {"before": m["local_ncc_before"], "affine": m["local_ncc_affine"],
                      "network": m["local_ncc_network"], "after": m["local_ncc_after"]},
        "refinement": m["refinement"],
        "heatmap": heat,
        "folding_fraction": m["folding_fraction"], "jacobian_range": [m["jacobian_min"], m["jacobian_max"]],
        "working_grid": m["working_grid"], "device": m["device"], "seconds": m["seconds"],
        "total_seconds": time.perf_counter() - t0, "files": files,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    say(format_summary(summary, names))
    say(f"report: {files['report']}\nall results: {out}/ (open fixed.nii.gz, moving.nii.gz, displacement.nii.gz "
        f"as a transform and warped.nii.gz in 3D Slicer)")
    return summary


def _stats(errors: np.ndarray) -> dict:
    return {"mean": float(errors.mean()), "median": float(np.median(errors)), "p90": float(np.percentile(errors, 90))}


def format_summary(s: dict, names: List[str]) -> str:
    le, ncc, dice = s["landmark_error_mm"], s["local_ncc"], s["mean_dice"]
    refined = s["refinement"]["iterations"] > 0
    after = "refined" if refined else "network"
    r = s["refinement"]
    lines = [
        f"working grid {s['working_grid']['shape_dhw']} at {s['working_grid']['spacing_mm']:.2f} mm on {s['device']}"
        + (f"; refinement: {r['iterations']} steps ({r['similarity']}), start: {r['start']}, local field start: "
           f"{r['local_start']}" if refined else "; refinement off"),
        f"{'':18s} {'before':>8s} {'network':>8s} {after if refined else '':>8s}",
        f"{'local NCC':18s} {ncc['before']:8.3f} {ncc['network']:8.3f} " + (f"{ncc['after']:8.3f}" if refined else ""),
        f"{'landmark error mm':18s} {le['before']['mean']:8.2f} {le['network']['mean']:8.2f} "
        + (f"{le['after']['mean']:8.2f}" if refined else "") + f"   (mean of 500 points; p90 {le['after']['p90']:.2f})",
        f"{'mean Dice':18s} {dice['before']:8.3f} {dice['network']:8.3f} " + (f"{dice['after']:8.3f}" if refined else ""),
        f"heatmap best match median {s['heatmap']['median_mm']:.1f} mm ({s['heatmap']['median_voxels']:.1f} "
        f"working voxels), p90 {s['heatmap']['p90_mm']:.1f} mm; {100 * s['heatmap']['peaked_fraction']:.1f} % of "
        f"the grid within 0.05 of the best (of {s['heatmap']['points']} points)",
        f"folding {100 * s['folding_fraction']:.3f} % of voxels; Jacobian in "
        f"[{s['jacobian_range'][0]:.2f}, {s['jacobian_range'][1]:.2f}]",
        f"Dice per structure (before -> network -> {after}):",
    ]
    lines += [f"  {name:28s} {d['before']:.3f} -> {d['network']:.3f} -> {d['after']:.3f}" for name, d in s["dice"].items()]
    if r.get("warning"):
        lines.append(f"warning: {r['warning']}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)
