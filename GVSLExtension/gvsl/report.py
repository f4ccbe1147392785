"""``report.png`` of Match pair: images in three orthogonal planes of the fixed working
grid (identity direction, LPS), shown in radiological convention."""
from __future__ import annotations

from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from .conventions import Grid, transform_points  # noqa: E402
from .heatmap_eval import PEAK_MARGIN  # noqa: E402

PLANES = ("axial", "coronal", "sagittal")
HEATMAP_RANGE = PEAK_MARGIN  # drawn: within this of the best, what heatmap_eval counts as "peaked"


def plane(volume: np.ndarray, name: str, index: Sequence[int]) -> np.ndarray:
    """2D slice of a (D, H, W) = (S, P, L) volume, rows top-to-bottom as displayed."""
    d, h, w = (int(i) for i in index)
    if name == "axial":
        return volume[d]  # rows: anterior -> posterior, columns: right -> left
    if name == "coronal":
        return volume[::-1, h, :]  # rows: superior -> inferior
    return volume[::-1, :, w]  # sagittal, columns: anterior -> posterior


def plane_xy(name: str, voxel, shape):
    """Display (column, row) of a voxel (d, h, w) in :func:`plane`'s slices."""
    d, h, w = voxel
    if name == "axial":
        return w, h
    if name == "coronal":
        return w, shape[0] - 1 - d
    return h, shape[0] - 1 - d


def _on_grid(image: sitk.Image, grid: Grid, default: float) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(image, grid.size, sitk.Transform(), sitk.sitkLinear, grid.origin,
                                                grid.spacing, grid.direction, default, sitk.sitkFloat32))


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    rows = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
    cols = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def match_report(result, answers: List[dict], path) -> None:
    grid = result.fixed_grid
    shape = grid.shape
    centre = tuple(s // 2 for s in shape)
    fixed = result.fixed_working
    moving_before = result.moving_on_fixed_working
    warped = result.warped_working
    jacobian = _on_grid(result.jacobian, grid, 1.0)

    rows = 3 + len(answers)
    fig, axes = plt.subplots(rows, 6, figsize=(18, 3.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])

    def show(ax, image, title, **kw):
        ax.imshow(image, cmap=kw.pop("cmap", "gray"), interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)

    for k, name in enumerate(PLANES):
        show(axes[0, k], plane(fixed, name, centre), f"fixed ({name})", vmin=0, vmax=1)
        show(axes[0, 3 + k], plane(moving_before, name, centre), f"moving, before ({name})", vmin=0, vmax=1)
        show(axes[1, k], plane(warped, name, centre), f"warped ({name})", vmin=0, vmax=1)
        show(axes[1, 3 + k], checkerboard(plane(fixed, name, centre), plane(warped, name, centre)),
             f"checkerboard fixed/warped ({name})", vmin=0, vmax=1)
        _deformation_grid(axes[2, k], result, name, centre, fixed)
        im = axes[2, 3 + k].imshow(plane(jacobian, name, centre), cmap="RdBu_r", vmin=0, vmax=2)
        axes[2, 3 + k].set_title(f"Jacobian determinant ({name})", fontsize=9)
    fig.colorbar(im, ax=axes[2, 5], fraction=0.046)

    for r, answer in enumerate(answers, start=3):
        source = answer["query_image"]
        target = "moving" if source == "fixed" else "fixed"
        heat, best, score = result.heatmap(answer["query_lps"], source, on_image_grid=False)
        src_grid = result.fixed_grid if source == "fixed" else result.moving_grid
        tgt_grid = result.fixed_grid if target == "fixed" else result.moving_grid
        src_vol = result.fixed_working if source == "fixed" else result.moving_working
        tgt_vol = result.fixed_working if target == "fixed" else result.moving_working
        q = np.round(transform_points(src_grid.physical_to_voxel(), np.asarray(answer["query_lps"]))).astype(int)
        q = np.clip(q, 0, np.asarray(shape) - 1)
        m = np.round(transform_points(tgt_grid.physical_to_voxel(), best)).astype(int)
        heat_arr = sitk.GetArrayFromImage(heat)
        for k, name in enumerate(PLANES):
            show(axes[r, k], plane(src_vol, name, q), f"query {answer['index']} in {source} ({name})", vmin=0, vmax=1)
            axes[r, k].plot(*plane_xy(name, q, shape), "c+", ms=12, mew=2)
            show(axes[r, 3 + k], plane(tgt_vol, name, m), f"{target} ({name}): similarity {score - HEATMAP_RANGE:.2f}-{score:.2f}",
                 vmin=0, vmax=1)
            # Only the top of the map is drawn (within HEATMAP_RANGE of the best): where the
            # network would put the point, not the whole body at "somewhat similar".
            shown = np.ma.masked_less(plane(heat_arr, name, m), score - HEATMAP_RANGE)
            axes[r, 3 + k].imshow(shown, cmap="jet", alpha=0.5, vmin=score - HEATMAP_RANGE, vmax=score)
            axes[r, 3 + k].plot(*plane_xy(name, m, shape), "w+", ms=12, mew=2)
    metrics = result.metrics
    fig.suptitle(f"GVSL Match pair — local NCC {metrics.get('local_ncc_before', float('nan')):.3f} → "
                 f"{metrics.get('local_ncc_after', float('nan')):.3f}, folding "
                 f"{100 * metrics.get('folding_fraction', 0):.2f} %", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _deformation_grid(ax, result, name, centre, background, lines_every_voxels: int = 6):
    """Iso-lines of the mapped moving-space coordinates over one plane of the fixed grid."""
    grid = result.fixed_grid
    spacing_mm = lines_every_voxels * grid.spacing[0]
    # Only the displayed plane's voxels, not the whole grid.
    axes = [np.arange(s, dtype=np.float64) for s in grid.shape]
    fixed_axis = {"axial": 0, "coronal": 1, "sagittal": 2}[name]
    axes[fixed_axis] = np.array([float(centre[fixed_axis])])
    vox = np.squeeze(np.stack(np.meshgrid(*axes, indexing="ij"), -1), axis=fixed_axis)
    pts = transform_points(grid.voxel_to_physical(), vox.reshape(-1, 3))
    mapped = result.map_points(pts).reshape(*vox.shape[:2], 3)
    ax.imshow(plane(background, name, centre), cmap="gray", vmin=0, vmax=1)
    axis_pairs = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[name]
    flip = name != "axial"
    for comp in axis_pairs:
        values = mapped[..., comp]
        if flip:
            values = values[::-1]
        levels = np.arange(np.floor(values.min() / spacing_mm), np.ceil(values.max() / spacing_mm) + 1) * spacing_mm
        if len(levels) > 1:
            ax.contour(values, levels=levels, colors="yellow", linewidths=0.5)
    ax.set_title(f"deformation grid ({name})", fontsize=9)
