"""How well the similarity heatmap finds the corresponding point.

For query points with a known counterpart (a pair under a known transform: any fixed point
and ``truth(point)``; two subjects: centroids of the same labelled structure), the error is
the distance in mm between the heatmap's best match and the true point. Reported: median and
90th percentile in mm and in working-grid voxels, and how peaked the maps are: the fraction
of the searched working grid whose similarity is within 0.05 of the best (1.0 = flat, every
voxel as good as the best; a sharp map is near 0).

Everything goes through :meth:`gvsl.match.MatchResult.heatmap`, the code path of ``gvsl
match --points``, ``report.png`` and the Slicer module's heatmap.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .conventions import Grid, transform_points

PEAK_MARGIN = 0.05


def heatmap_errors(result, query_lps: np.ndarray, true_lps: np.ndarray, source: str = "fixed",
                   weights=None, window=None, subvoxel: bool = True) -> Dict[str, np.ndarray]:
    """Per query: error (mm) of the best match and the fraction of the target working grid
    within ``PEAK_MARGIN`` of the best similarity. ``subvoxel=False``: the integer maximum,
    without :func:`gvsl.descriptors.subvoxel_peak`."""
    errors, peaked = [], []
    for query, truth in zip(np.asarray(query_lps, float).reshape(-1, 3), np.asarray(true_lps, float).reshape(-1, 3)):
        heat, best, score = result.heatmap(query, source, on_image_grid=False, weights=weights, window=window,
                                           subvoxel=subvoxel)
        values = sitk.GetArrayViewFromImage(heat)
        errors.append(float(np.linalg.norm(best - truth)))
        peaked.append(float((values >= score - PEAK_MARGIN).mean()))
    return {"error_mm": np.asarray(errors), "peaked_fraction": np.asarray(peaked)}


def summarize(errors_mm: np.ndarray, peaked: np.ndarray, voxel_mm: float) -> dict:
    return {"points": int(len(errors_mm)),
            "median_mm": float(np.median(errors_mm)), "p90_mm": float(np.percentile(errors_mm, 90)),
            "median_voxels": float(np.median(errors_mm) / voxel_mm),
            "peaked_fraction": float(np.median(peaked)), "voxel_mm": float(voxel_mm)}


def heatmap_accuracy(result, query_lps, true_lps, source: str = "fixed", weights=None, window=None,
                     subvoxel: bool = True) -> dict:
    """:func:`summarize` of :func:`heatmap_errors` (voxels of the target's working grid)."""
    target_grid = result.moving_grid if source == "fixed" else result.fixed_grid
    raw = heatmap_errors(result, query_lps, true_lps, source, weights, window, subvoxel)
    return summarize(raw["error_mm"], raw["peaked_fraction"], target_grid.spacing[0])


def foreground_queries(fixed_labels: sitk.Image, truth: sitk.Transform, count: int = 60, seed: int = 0):
    """(fixed LPS points inside labelled structures, their true moving points) for a known transform."""
    from .demo import foreground_points
    points = foreground_points(fixed_labels, count, seed)
    return points, np.array([truth.TransformPoint(p.tolist()) for p in points])


def centroid_queries(fixed_labels: sitk.Image, moving_labels: sitk.Image, split: int = 2,
                     labels: Optional[Sequence[int]] = None):
    """(fixed, moving) LPS centroids of the same structures in two subjects. With ``split`` > 1
    each structure is also cut into split^3 parts by its own bounding box (left/right,
    front/back, up/down halves for 2), so large structures such as grey matter still give
    several points; corresponding parts are only approximately the same anatomy."""
    fixed_pts, moving_pts = [], []
    f_arr, m_arr = sitk.GetArrayFromImage(fixed_labels), sitk.GetArrayFromImage(moving_labels)
    ids = labels if labels is not None else sorted(set(np.unique(f_arr)) & set(np.unique(m_arr)) - {0})
    for k in ids:
        for arr, image, out in ((f_arr, fixed_labels, fixed_pts), (m_arr, moving_labels, moving_pts)):
            phys = transform_points(Grid.of(image).voxel_to_physical(), np.argwhere(arr == k).astype(np.float64))
            lo, hi = phys.min(0), phys.max(0)
            cell = np.clip(((phys - lo) / np.maximum(hi - lo, 1e-6) * split).astype(int), 0, split - 1)
            code = (cell * np.array([split * split, split, 1])).sum(1)
            out.append([phys[code == c].mean(0) if (code == c).any() else np.full(3, np.nan)
                        for c in range(split ** 3)])
    f, m = np.asarray(fixed_pts).reshape(-1, 3), np.asarray(moving_pts).reshape(-1, 3)
    keep = ~(np.isnan(f).any(1) | np.isnan(m).any(1))
    return f[keep], m[keep]
