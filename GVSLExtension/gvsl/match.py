"""Match pair in physical space: ``match_pair(fixed, moving, model)``.

Both volumes are resampled onto working grids (identity direction, isotropic, one common
size, each centred on its own image; see :func:`gvsl.data.fitting_grid`), the network
runs once without gradients, and every result is mapped back to LPS millimetres:

* ``affine_transform``: ITK affine, fixed point -> moving point (the affine part).
* ``displacement``: ITK displacement field on the fixed image's grid (coarsened only if
  it would exceed ``max_field_voxels``), LPS mm vectors, holding the whole mapping:
  ``T(x) = x + u(x)`` maps a fixed point to the moving point, so resampling the moving
  image through it (ITK's convention) gives ``warped``.
* ``warped``: the moving image on the fixed image's grid.
* ``jacobian``: determinant of the mapping's Jacobian (SimpleITK), on the field grid.

Conventions: :mod:`gvsl.conventions`.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .conventions import Grid, sample_at, transform_points, voxel_affine_to_matrix
from .descriptors import descriptor_features, similarity
from .data import InputError, fitting_grid, normalized_image, read_image, resample_to
from .losses import LocalNCCLoss

ImageLike = Union[str, Path, sitk.Image]
DEFAULT_MAX_FIELD_VOXELS = 1 << 24  # 16.7 M voxels: 400 MB as an ITK float64 vector field


def _as_image(image: ImageLike, name: str) -> sitk.Image:
    if isinstance(image, sitk.Image):
        from .data import check_image
        return check_image(sitk.Cast(image, sitk.sitkFloat32), name)
    return sitk.Cast(read_image(image), sitk.sitkFloat32)


def default_checkpoint() -> Path:
    """The small GVSL model this project pre-trained and ships (see assets/MODEL_CARD.md)."""
    return Path(__file__).parent / "assets" / "gvsl_demo_w025.pt"


def training_grid(model) -> dict:
    """Spacing (mm) and largest patch side the model was pre-trained with, if recorded."""
    meta = getattr(model, "checkpoint_meta", None) or {}
    config = meta.get("config") or {}
    spacing = (meta.get("preprocessing") or {}).get("spacing")
    patch = config.get("patch")
    return {"spacing": float(spacing) if spacing else 1.0, "max_size": int(max(patch)) if patch else 128}


def _voxel_points(grid: Grid, d_start: int, d_stop: int) -> torch.Tensor:
    return torch.from_numpy(grid.physical_points(d_start, d_stop))


@dataclass
class MatchResult:
    """Everything Match pair produced; see the module docstring for directions."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_grid: Grid  # working grids
    moving_grid: Grid
    voxel_affine: np.ndarray  # (3, 4) centred, fixed working voxel -> moving working voxel
    local_displacement: torch.Tensor  # (1, 3, D, H, W) working voxels: flow minus its affine part
    affine_transform: sitk.AffineTransform
    displacement: sitk.Image
    warped: sitk.Image
    jacobian: sitk.Image
    metrics: dict
    features: Dict[str, torch.Tensor]  # "fixed"/"moving" (C, D, H, W) + coarser "fixed@16"...: gvsl.descriptors
    fixed_working: np.ndarray = None  # normalised intensities (D, H, W), for reports
    moving_working: np.ndarray = None
    warped_working: np.ndarray = None
    moving_on_fixed_working: np.ndarray = None  # moving on the fixed working grid, no transform

    # ------------------------------------------------------------------ mapping
    def physical_affine_matrix(self) -> np.ndarray:
        """4x4 LPS matrix of the affine part (fixed point -> moving point)."""
        voxel = voxel_affine_to_matrix(self.voxel_affine, self.fixed_grid.shape)
        return self.moving_grid.voxel_to_physical() @ voxel @ self.fixed_grid.physical_to_voxel()

    def map_points(self, fixed_points_lps, affine_only: bool = False) -> np.ndarray:
        """Map fixed-space LPS points (K, 3) to moving-space LPS points, as the network says."""
        x = torch.as_tensor(np.asarray(fixed_points_lps, dtype=np.float64).reshape(-1, 3))
        return self._map(x, affine_only).numpy()

    def _map(self, x: torch.Tensor, affine_only: bool = False) -> torch.Tensor:
        to_voxel = torch.from_numpy(self.fixed_grid.physical_to_voxel())
        p = x @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        voxel = torch.from_numpy(voxel_affine_to_matrix(self.voxel_affine, self.fixed_grid.shape))
        q = p @ voxel[:3, :3].T + voxel[:3, 3]
        if not affine_only:
            coords = p.T.reshape(1, 3, -1, 1, 1).float()
            local = sample_at(self.local_displacement, coords, padding_mode="border")
            q = q + local.reshape(3, -1).T.double()
        to_phys = torch.from_numpy(self.moving_grid.voxel_to_physical())
        return q @ to_phys[:3, :3].T + to_phys[:3, 3]

    # ----------------------------------------------------------------- heatmap
    def heatmap(self, point_lps, source: str = "fixed", target: Optional[str] = None,
                on_image_grid: bool = True, weights=None, window=None) -> Tuple[sitk.Image, np.ndarray, float]:
        """Multi-scale feature similarity (:mod:`gvsl.descriptors`) between ``point_lps`` of
        ``source`` and every voxel of ``target`` (default: the other image). Returns
        (heatmap image in the target's physical space, best-matching LPS point, its similarity)."""
        if source not in ("fixed", "moving"):
            raise ValueError("source must be 'fixed' or 'moving'")
        target = target or ("moving" if source == "fixed" else "fixed")
        src_grid = self.fixed_grid if source == "fixed" else self.moving_grid
        tgt_grid = self.fixed_grid if target == "fixed" else self.moving_grid
        p = transform_points(src_grid.physical_to_voxel(), np.asarray(point_lps, dtype=np.float64).reshape(1, 3))
        sim, best_voxel, score = similarity(self.features, source, target, p[0], weights, window)
        best_lps = transform_points(tgt_grid.voxel_to_physical(), best_voxel)
        image = sitk.GetImageFromArray(sim.numpy())
        tgt_grid.apply_to(image)
        if on_image_grid:
            reference = self.fixed if target == "fixed" else self.moving
            image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1.0, sitk.sitkFloat32)
        return image, best_lps, score

    # -------------------------------------------------------------- state file
    def save_state(self, path) -> Path:
        """Everything heatmap queries and point mapping need (features, grids, fields) in
        one ``.npz``; :meth:`load_state` rebuilds the result from it and the saved files."""
        path = Path(path)
        np.savez(path, voxel_affine=self.voxel_affine, local_displacement=self.local_displacement.numpy(),
                 **{f"features_{key}": value.to(torch.float16).numpy() for key, value in self.features.items()},
                 fixed_working=self.fixed_working, moving_working=self.moving_working,
                 warped_working=self.warped_working, moving_on_fixed_working=self.moving_on_fixed_working,
                 grids=json.dumps({"fixed": self.fixed_grid.to_json(), "moving": self.moving_grid.to_json()}),
                 metrics=json.dumps(self.metrics))
        return path

    @staticmethod
    def load_state(out_dir, fixed: sitk.Image, moving: sitk.Image) -> "MatchResult":
        """A result written by ``gvsl match --save-state`` (the files of :meth:`save` plus
        ``state.npz``), e.g. by a child process."""
        out = Path(out_dir)
        state = np.load(out / "state.npz")
        grids = json.loads(str(state["grids"]))
        as_grid = lambda g: Grid(tuple(g["origin"]), tuple(g["spacing"]), tuple(g["direction"]), tuple(g["size"]))
        affine = sitk.ReadTransform(str(out / "affine.tfm"))
        affine = sitk.AffineTransform(affine.Downcast()) if hasattr(affine, "Downcast") else affine
        return MatchResult(
            fixed=fixed, moving=moving, fixed_grid=as_grid(grids["fixed"]), moving_grid=as_grid(grids["moving"]),
            voxel_affine=state["voxel_affine"], local_displacement=torch.from_numpy(state["local_displacement"]),
            affine_transform=affine, displacement=sitk.ReadImage(str(out / "displacement.nii.gz")),
            warped=sitk.ReadImage(str(out / "warped.nii.gz")), jacobian=sitk.ReadImage(str(out / "jacobian.nii.gz")),
            metrics=json.loads(str(state["metrics"])),
            features={key[len("features_"):]: torch.from_numpy(state[key]).float()
                      for key in state.files if key.startswith("features_")},
            fixed_working=state["fixed_working"], moving_working=state["moving_working"],
            warped_working=state["warped_working"], moving_on_fixed_working=state["moving_on_fixed_working"])

    # ------------------------------------------------------------------- export
    def save(self, out_dir, points: Sequence[dict] = (), report: bool = True) -> Dict[str, str]:
        """Write affine.tfm, displacement.nii.gz, warped.nii.gz, jacobian.nii.gz,
        metrics.json, heatmap_<k>.nii.gz + points.json and report.png."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        files = {"affine": out / "affine.tfm", "displacement": out / "displacement.nii.gz",
                 "warped": out / "warped.nii.gz", "jacobian": out / "jacobian.nii.gz",
                 "metrics": out / "metrics.json"}
        sitk.WriteTransform(self.affine_transform, str(files["affine"]))
        sitk.WriteImage(self.displacement, str(files["displacement"]))
        sitk.WriteImage(self.warped, str(files["warped"]))
        sitk.WriteImage(self.jacobian, str(files["jacobian"]))
        answers = []
        for k, query in enumerate(points):
            heat, best, score = self.heatmap(query["point"], query.get("image", "fixed"))
            path = out / f"heatmap_{k}.nii.gz"
            sitk.WriteImage(heat, str(path))
            answers.append({"index": k, "query_lps": list(map(float, query["point"])),
                            "query_image": query.get("image", "fixed"), "best_match_lps": best.tolist(),
                            "similarity": score, "heatmap": path.name})
        if points:
            files["points"] = out / "points.json"
            files["points"].write_text(json.dumps(answers, indent=2), encoding="utf-8")
        if report:
            from .report import match_report
            files["report"] = out / "report.png"
            match_report(self, answers, files["report"])
        self.metrics.setdefault("seconds", {})["export"] = time.perf_counter() - t0
        files["metrics"].write_text(json.dumps(self.metrics, indent=2), encoding="utf-8")
        return {k: str(v) for k, v in files.items()}


def foreground_mask(normalized: np.ndarray) -> np.ndarray:
    """Otsu foreground of a [0, 1] volume (D, H, W)."""
    image = sitk.GetImageFromArray(normalized.astype(np.float32))
    return sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1)).astype(bool)


def match_pair(fixed: ImageLike, moving: ImageLike, model=None, device: str = "auto", preset: str = "auto",
               spacing_mm: Optional[float] = None, max_size: Optional[int] = None,
               max_field_voxels: int = DEFAULT_MAX_FIELD_VOXELS, progress=None) -> MatchResult:
    """Match ``moving`` onto ``fixed`` (SimpleITK images or file paths) with a GVSL model
    (a module, a checkpoint path, or None for the shipped demo model).

    ``spacing_mm`` and ``max_size`` default to the grid the model was trained on (its
    checkpoint's spacing and patch size), so the network sees what it learned from; for
    weights without that record (the official ones) they default to 1 mm and 128."""
    from .checkpoint import load_model
    from .runtime import autocast_context, pick_device

    say = progress or (lambda stage, fraction: None)
    seconds = {}
    t0 = time.perf_counter()
    fixed_image = _as_image(fixed, str(fixed) if not isinstance(fixed, sitk.Image) else "fixed image")
    moving_image = _as_image(moving, str(moving) if not isinstance(moving, sitk.Image) else "moving image")
    dev = pick_device(device)
    if model is None or isinstance(model, (str, Path)):
        path = model or default_checkpoint()
        model = load_model(path)
    model = model.to(dev).eval()
    trained = training_grid(model)
    spacing_mm = trained["spacing"] if spacing_mm is None else spacing_mm
    max_size = trained["max_size"] if max_size is None else max_size
    fixed_norm, fixed_preset = normalized_image(fixed_image, preset)
    moving_norm, moving_preset = normalized_image(moving_image, preset)
    fixed_grid, moving_grid = fitting_grid([fixed_image, moving_image], spacing_mm, max_size)
    fixed_w = sitk.GetArrayFromImage(resample_to(fixed_norm, fixed_grid))
    moving_w = sitk.GetArrayFromImage(resample_to(moving_norm, moving_grid))
    seconds["load_resample"] = time.perf_counter() - t0
    say("network", 0.3)

    t0 = time.perf_counter()
    a = torch.from_numpy(fixed_w)[None, None].to(dev)
    b = torch.from_numpy(moving_w)[None, None].to(dev)
    try:
        with torch.no_grad(), autocast_context(dev, dev.type == "cuda"):
            out = model(a, b, restore=False)
    except (RuntimeError, MemoryError) as exc:
        if "memory" in str(exc).lower():
            raise MemoryError(f"the {fixed_grid.shape} working grid does not fit in {dev} memory; "
                              f"lower --max-size (now {max_size}) or use a coarser --spacing") from exc
        raise
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds["network"] = time.perf_counter() - t0
    say("fields", 0.6)

    t0 = time.perf_counter()
    features = descriptor_features(out)
    voxel_affine = out.affine[0].double().cpu().numpy()
    local = (out.flow - out.affine_flow).float().cpu()
    warped_w = out.warped[0, 0].float().cpu().numpy()
    result = MatchResult(fixed_image, moving_image, fixed_grid, moving_grid, voxel_affine, local,
                         None, None, None, None, {}, features, fixed_w, moving_w, warped_w)
    physical = result.physical_affine_matrix()
    affine_tx = sitk.AffineTransform(3)
    affine_tx.SetMatrix(physical[:3, :3].ravel().tolist())
    affine_tx.SetTranslation(physical[:3, 3].tolist())
    result.affine_transform = affine_tx

    field_grid = Grid.of(fixed_image).coarsened(max_field_voxels)
    result.displacement = _displacement_image(result, field_grid)
    result.warped = _warp_moving(result)
    result.jacobian = jacobian_determinant(result.displacement)
    seconds["fields"] = time.perf_counter() - t0

    jac = sitk.GetArrayViewFromImage(result.jacobian)
    mask = foreground_mask(fixed_w)
    moving_on_fixed = sitk.GetArrayFromImage(resample_to(moving_norm, fixed_grid))
    affine_w = sitk.GetArrayFromImage(sitk.Resample(moving_norm, fixed_grid.size, affine_tx, sitk.sitkLinear,
                                                    fixed_grid.origin, fixed_grid.spacing, fixed_grid.direction,
                                                    0.0, sitk.sitkFloat32))
    ncc = LocalNCCLoss(9)
    m = torch.from_numpy(mask)[None, None]
    target = torch.from_numpy(fixed_w)[None, None]

    def local_ncc(arr):
        return float(1.0 - ncc(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None], target, m))

    result.moving_on_fixed_working = moving_on_fixed
    result.metrics = {
        "local_ncc_before": local_ncc(moving_on_fixed),
        "local_ncc_affine": local_ncc(affine_w),
        "local_ncc_after": local_ncc(warped_w),
        "ncc_note": "mean squared local NCC (9^3 window) inside the fixed image's Otsu foreground, on the working grid",
        "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max()), "jacobian_mean": float(jac.mean()),
        "folding_fraction": float((jac <= 0).mean()),
        "affine_matrix_lps": physical.tolist(),
        "working_grid": {"shape_dhw": list(fixed_grid.shape), "spacing_mm": fixed_grid.spacing[0],
                         "capped": bool(fixed_grid.spacing[0] > spacing_mm + 1e-9)},
        "field_grid": field_grid.to_json(),
        "device": str(dev), "presets": {"fixed": fixed_preset, "moving": moving_preset},
        "seconds": seconds,
    }
    say("done", 1.0)
    return result


def jacobian_determinant(displacement: sitk.Image) -> sitk.Image:
    """det(I + du/dx) of an ITK displacement field, with derivatives in physical (LPS)
    space. ITK's DisplacementFieldJacobianDeterminantFilter uses spacing but ignores the
    direction matrix, which is wrong for flipped or oblique grids (e.g. CTChest4)."""
    grid = Grid.of(displacement)
    u = sitk.GetArrayViewFromImage(displacement).astype(np.float32)  # (D, H, W, 3)
    du_dp = np.stack(np.gradient(u, axis=(0, 1, 2)), axis=-1)  # (D, H, W, 3 components, 3 voxel axes)
    dp_dx = grid.physical_to_voxel()[:3, :3].astype(np.float32)
    jac = np.einsum("dhwik,kj->dhwij", du_dp, dp_dx)
    jac += np.eye(3, dtype=np.float32)
    image = sitk.GetImageFromArray(np.linalg.det(jac).astype(np.float32))
    image.CopyInformation(displacement)
    return image


def _displacement_image(result: MatchResult, grid: Grid, chunk_voxels: int = 1 << 21) -> sitk.Image:
    """ITK displacement field (LPS mm, float64) of the whole mapping on ``grid``."""
    d_total = grid.shape[0]
    rows = max(1, chunk_voxels // (grid.shape[1] * grid.shape[2]))
    field_array = np.empty((*grid.shape, 3), dtype=np.float64)
    for d0 in range(0, d_total, rows):
        d1 = min(d_total, d0 + rows)
        x = _voxel_points(grid, d0, d1)
        field_array[d0:d1] = (result._map(x) - x).reshape(d1 - d0, grid.shape[1], grid.shape[2], 3).numpy()
    image = sitk.GetImageFromArray(field_array, isVector=True)
    return grid.apply_to(image)


def _warp_moving(result: MatchResult, chunk_voxels: int = 1 << 21) -> sitk.Image:
    """The moving image sampled (trilinear, in torch) on the fixed image's own grid."""
    grid = Grid.of(result.fixed)
    moving_grid = Grid.of(result.moving)
    moving = torch.from_numpy(sitk.GetArrayFromImage(result.moving).astype(np.float32))[None, None]
    to_voxel = torch.from_numpy(moving_grid.physical_to_voxel())
    background = float(sitk.GetArrayViewFromImage(result.moving).min())
    rows = max(1, chunk_voxels // (grid.shape[1] * grid.shape[2]))
    out = np.empty(grid.shape, dtype=np.float32)
    for d0 in range(0, grid.shape[0], rows):
        d1 = min(grid.shape[0], d0 + rows)
        y = result._map(_voxel_points(grid, d0, d1))
        q = (y @ to_voxel[:3, :3].T + to_voxel[:3, 3]).float()
        coords = q.T.reshape(1, 3, -1, 1, 1)
        # Zero padding of (moving - background): outside the moving image reads as background.
        values = sample_at(moving - background, coords).reshape(-1) + background
        out[d0:d1] = values.reshape(d1 - d0, grid.shape[1], grid.shape[2]).numpy()
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(result.fixed)
    return image


# ----------------------------------------------------------------------------- CLI


def read_points(path) -> List[dict]:
    """Query points: CSV rows ``x,y,z[,image]`` or JSON ``[{"point": [x,y,z], "image": ...}]``
    in LPS mm (add ``"space": "RAS"`` in JSON for Slicer coordinates)."""
    from .conventions import ras_to_lps
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: points file not found")
    points = []
    try:
        if path.suffix.lower() == ".json":
            for item in json.loads(path.read_text(encoding="utf-8")):
                if isinstance(item, (list, tuple)):
                    item = {"point": item}
                p = np.asarray(item["point"], dtype=float)
                if str(item.get("space", "LPS")).upper() == "RAS":
                    p = ras_to_lps(p)
                points.append({"point": p.tolist(), "image": item.get("image", "fixed")})
        else:
            for row in csv.reader(path.read_text(encoding="utf-8").splitlines()):
                if not row or row[0].strip().startswith("#"):
                    continue
                try:
                    xyz = [float(v) for v in row[:3]]
                except ValueError:
                    continue  # header
                points.append({"point": xyz, "image": (row[3].strip() if len(row) > 3 else "fixed") or "fixed"})
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: cannot read points ({exc})") from None
    for p in points:
        if p["image"] not in ("fixed", "moving"):
            raise InputError(f"{path}: image must be 'fixed' or 'moving', got {p['image']!r}")
    return points


def match_cli(args):
    from .runtime import Reporter, error_events
    reporter = Reporter(args.progress)
    with error_events(reporter):
        reporter.event("start", step=0, total=4)
        points = read_points(args.points) if args.points else []

        def progress(stage, fraction):
            reporter.event("progress", step=int(fraction * 3), total=4, stage=stage, loss={}, eta_s=0.0)

        result = match_pair(args.fixed, args.moving, args.checkpoint, device=args.device, preset=args.preset,
                            spacing_mm=args.spacing, max_size=args.max_size, progress=progress)
        files = result.save(args.out, points, report=not args.no_report)
        if args.save_state:
            files["state"] = str(result.save_state(Path(args.out) / "state.npz"))
        reporter.event("progress", step=4, total=4, stage="export", loss={}, eta_s=0.0)
        m = result.metrics
        print(f"local NCC {m['local_ncc_before']:.3f} -> affine {m['local_ncc_affine']:.3f} -> "
              f"deformable {m['local_ncc_after']:.3f}; folding {100 * m['folding_fraction']:.3f} %; "
              f"working grid {m['working_grid']['shape_dhw']} at {m['working_grid']['spacing_mm']:.2f} mm",
              flush=True)
        reporter.event("done", files=files, metrics={k: v for k, v in m.items() if k != "field_grid"})
