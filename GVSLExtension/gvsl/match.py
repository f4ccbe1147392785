"""Match pair in physical space: ``match_pair(fixed, moving, model)``.

Both volumes are resampled onto working grids (identity direction, isotropic, one common
size, each centred on its own image; see :func:`gvsl.data.fitting_grid`), the network
runs once without gradients, its answer is refined on the pair itself
(:mod:`gvsl.refine`, unless ``refine_iters=0``), and every result is a
:class:`gvsl.mapping.Mapping` exported in LPS millimetres:

* ``affine_transform``: ITK affine, fixed point -> moving point (the affine part).
* ``displacement``: ITK displacement field on the fixed image's grid (coarsened only if
  it would exceed ``max_field_voxels``), LPS mm vectors, holding the whole mapping:
  ``T(x) = x + u(x)`` maps a fixed point to the moving point, so resampling the moving
  image through it (ITK's convention) gives ``warped``.
* ``warped``: the moving image on the fixed image's grid.
* ``jacobian``: determinant of the mapping's Jacobian, on the field grid.
* ``network_displacement.nii.gz`` (written by :meth:`MatchResult.save`): the network's
  own answer, beside the refined one.

Conventions: :mod:`gvsl.conventions`.
"""
from __future__ import annotations

import csv
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .conventions import Grid, transform_points, voxel_affine_to_matrix
from .descriptors import descriptor_features, similarity
from .data import InputError, fitting_grid, normalized_image, read_image, resample_to
from .losses import LocalNCCLoss
from .mapping import Mapping, local_jacobian_determinant, voxel_flow_to_lps

ImageLike = Union[str, Path, sitk.Image]
DEFAULT_MAX_FIELD_VOXELS = 1 << 24  # 16.7 M voxels: 400 MB as an ITK float64 vector field
# What ``gvsl match --save-state`` writes for the Slicer panel, which must not compute it on
# its main thread: the local part of the mapping on the moving grid (coarsened to this many
# voxels, so that the grid transform stays light in Slicer), uncompressed so it reads fast.
RESIDUAL_FILE = "residual_displacement.nrrd"
RESIDUAL_MAX_VOXELS = 1 << 22
# Uncompressed copies of warped.nii.gz and jacobian.nii.gz, also for the panel: inflating
# the gzip files takes most of a second for a 256x256x300 pair on Slicer's main thread.
PANEL_IMAGE_FILES = {"warped": "warped.nrrd", "jacobian": "jacobian.nrrd"}


def _as_image(image: ImageLike, name: str) -> sitk.Image:
    if isinstance(image, sitk.Image):
        from .data import check_image
        image = check_image(image, name)
    else:
        image = read_image(image)
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


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


@dataclass
class MatchResult:
    """Everything Match pair produced; see the module docstring for directions.

    ``mapping`` is the answer (refined when refinement ran), ``network_mapping`` the
    network's own; ``voxel_affine`` and ``local_displacement`` are the network's raw
    outputs on the working grids."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_grid: Grid  # working grids
    moving_grid: Grid
    voxel_affine: np.ndarray  # (3, 4) centred, fixed working voxel -> moving working voxel
    local_displacement: torch.Tensor  # (1, 3, D, H, W) working voxels: flow minus its affine part
    mapping: Mapping
    network_mapping: Mapping
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
        """4x4 LPS matrix of the answer's affine part (fixed point -> moving point)."""
        return self.mapping.affine

    def residual_displacement(self, max_voxels: int = RESIDUAL_MAX_VOXELS) -> sitk.Image:
        """The local part of the mapping on the moving image's grid (LPS mm, float32 vectors,
        ITK resampling direction): ``r(y) = T(P^-1 y) - y``, so ``T = (id + r) o P`` with P
        the affine part. A moving volume under a grid transform of ``r`` under a linear
        transform of P is aligned to the fixed volume (what the Slicer panel builds)."""
        grid = Grid.of(self.moving).coarsened(max_voxels)
        inverse = np.linalg.inv(self.physical_affine_matrix())
        y = grid.physical_points()
        residual = self.map_points(y @ inverse[:3, :3].T + inverse[:3, 3]) - y
        image = sitk.GetImageFromArray(residual.reshape(*grid.shape, 3).astype(np.float32), isVector=True)
        return grid.apply_to(image)

    def map_points(self, fixed_points_lps, affine_only: bool = False, network: bool = False) -> np.ndarray:
        """Map fixed-space LPS points (K, 3) to moving-space LPS points (the network's own
        answer with ``network=True``)."""
        mapping = self.network_mapping if network else self.mapping
        return mapping.map_points(fixed_points_lps, affine_only)

    # ----------------------------------------------------------------- heatmap
    def heatmap(self, point_lps, source: str = "fixed", target: Optional[str] = None,
                on_image_grid: bool = True, weights=None, window=None,
                subvoxel: bool = True) -> Tuple[sitk.Image, np.ndarray, float]:
        """Multi-scale feature similarity (:mod:`gvsl.descriptors`) between ``point_lps`` of
        ``source`` and every voxel of ``target`` (default: the other image). Returns
        (heatmap image in the target's physical space, best-matching LPS point, its similarity);
        the best point is refined to a fraction of a working voxel unless ``subvoxel`` is False."""
        if source not in ("fixed", "moving"):
            raise ValueError("source must be 'fixed' or 'moving'")
        target = target or ("moving" if source == "fixed" else "fixed")
        src_grid = self.fixed_grid if source == "fixed" else self.moving_grid
        tgt_grid = self.fixed_grid if target == "fixed" else self.moving_grid
        p = transform_points(src_grid.physical_to_voxel(), np.asarray(point_lps, dtype=np.float64).reshape(1, 3))
        sim, best_voxel, score = similarity(self.features, source, target, p[0], weights, window, subvoxel=subvoxel)
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
        one ``.npz``; :meth:`load_state` rebuilds the result from it and the saved files.
        Written under a temporary name and renamed once complete."""
        from .safe_io import StagedFiles, strict_json
        path = Path(path)
        grids = json.dumps({"fixed": self.fixed_grid.to_json(), "moving": self.moving_grid.to_json()})
        metrics = strict_json(self.metrics, f"{path} (metrics)")
        mappings = {}
        for name, mapping in (("mapping", self.mapping), ("network_mapping", self.network_mapping)):
            mappings[f"{name}_affine"] = mapping.affine
            mappings[f"{name}_local"] = mapping.local.numpy() if mapping.local is not None else np.zeros(0)
            mappings[f"{name}_grid"] = json.dumps(mapping.grid.to_json() if mapping.grid is not None else None)

        def write(tmp):
            with open(tmp, "wb") as handle:  # a handle: np.savez would append .npz to a path
                np.savez(handle, voxel_affine=self.voxel_affine, local_displacement=self.local_displacement.numpy(),
                         **{f"features_{key}": value.to(torch.float16).numpy() for key, value in self.features.items()},
                         fixed_working=self.fixed_working, moving_working=self.moving_working,
                         warped_working=self.warped_working, moving_on_fixed_working=self.moving_on_fixed_working,
                         grids=grids, metrics=metrics, **mappings)

        def verify(tmp):
            with np.load(tmp) as stored:  # reading every member checks each one's CRC
                for key in stored.files:
                    stored[key]

        with StagedFiles(path.parent) as stage:
            stage.write_with(path.name, write, verify)
        return path

    @staticmethod
    def load_state(out_dir, fixed: sitk.Image, moving: sitk.Image, read_fields: bool = True) -> "MatchResult":
        """A result written by ``gvsl match --save-state`` (the files of :meth:`save` plus
        ``state.npz``), e.g. by a child process. ``read_fields=False`` skips reading the
        displacement, warped and Jacobian files (left None), for callers that need only
        the mapping and the features (heatmaps, point mapping)."""
        out = Path(out_dir)
        state = np.load(out / "state.npz")
        grids = json.loads(str(state["grids"]))
        as_grid = lambda g: Grid(tuple(g["origin"]), tuple(g["spacing"]), tuple(g["direction"]), tuple(g["size"]))
        def mapping(name):
            grid = json.loads(str(state[f"{name}_grid"]))
            local = state[f"{name}_local"]
            return Mapping(state[f"{name}_affine"], torch.from_numpy(local) if local.size else None,
                           as_grid(grid) if grid else None)

        final, network = mapping("mapping"), mapping("network_mapping")
        if np.array_equal(final.affine, network.affine) and (final.grid == network.grid):
            network = final
        affine = sitk.ReadTransform(str(out / "affine.tfm"))
        affine = sitk.AffineTransform(affine.Downcast()) if hasattr(affine, "Downcast") else affine
        return MatchResult(
            fixed=fixed, moving=moving, fixed_grid=as_grid(grids["fixed"]), moving_grid=as_grid(grids["moving"]),
            voxel_affine=state["voxel_affine"], local_displacement=torch.from_numpy(state["local_displacement"]),
            mapping=final, network_mapping=network, affine_transform=affine,
            displacement=sitk.ReadImage(str(out / "displacement.nii.gz")) if read_fields else None,
            warped=sitk.ReadImage(str(out / "warped.nii.gz")) if read_fields else None,
            jacobian=sitk.ReadImage(str(out / "jacobian.nii.gz")) if read_fields else None,
            metrics=json.loads(str(state["metrics"])),
            features={key[len("features_"):]: torch.from_numpy(state[key]).float()
                      for key in state.files if key.startswith("features_")},
            fixed_working=state["fixed_working"], moving_working=state["moving_working"],
            warped_working=state["warped_working"], moving_on_fixed_working=state["moving_on_fixed_working"])

    # ------------------------------------------------------------------- export
    def save(self, out_dir, points: Sequence[dict] = (), report: bool = True,
             also: Sequence[str] = ()) -> Dict[str, str]:
        """Write affine.tfm, displacement.nii.gz, warped.nii.gz, jacobian.nii.gz,
        metrics.json, heatmap_<k>.nii.gz + points.json and report.png.

        All or nothing: each file is written under a temporary name and read back, values
        must be finite, and the files get their final names (metrics.json last) only when
        every one is complete; on any failure the folder keeps what it held before."""
        from .data import check_points
        from .safe_io import NonFiniteError, StagedFiles, non_finite_paths
        out = Path(out_dir)
        t0 = time.perf_counter()
        points = check_points(points, {"fixed": Grid.of(self.fixed), "moving": Grid.of(self.moving)})
        bad = non_finite_paths(self.metrics)
        if bad:
            raise NonFiniteError(f"the result holds NaN or infinite values ({', '.join(bad[:4])}); nothing "
                                       f"was written to {out}. Check the model's weights (--checkpoint) and the "
                                       f"input intensities")
        names = {"affine": "affine.tfm", "displacement": "displacement.nii.gz", "warped": "warped.nii.gz",
                 "jacobian": "jacobian.nii.gz"}
        files = {}
        with StagedFiles(out) as stage:
            files["affine"] = stage.write_transform(names["affine"], self.affine_transform)
            for key in ("displacement", "warped", "jacobian"):
                files[key] = stage.write_image(names[key], getattr(self, key))
            if self.network_mapping is not self.mapping:
                files["network_displacement"] = stage.write_image(
                    "network_displacement.nii.gz", displacement_image(self.network_mapping, Grid.of(self.displacement)))
            answers = []
            for k, query in enumerate(points):
                heat, best, score = self.heatmap(query["point"], query.get("image", "fixed"))
                name = f"heatmap_{k}.nii.gz"
                stage.write_image(name, heat)
                answers.append({"index": k, "query_lps": list(map(float, query["point"])),
                                "query_image": query.get("image", "fixed"), "best_match_lps": best.tolist(),
                                "similarity": score, "heatmap": name})
            if points:
                files["points"] = stage.write_json("points.json", answers)
            if report:
                from .report import match_report
                files["report"] = stage.write_with("report.png", lambda tmp: match_report(self, answers, tmp))
            self.metrics.setdefault("seconds", {})["export"] = time.perf_counter() - t0
            # What this result consists of (``also``: files written after it, e.g. state.npz),
            # so that a later run into the same folder removes exactly these and nothing else.
            self.metrics["outputs"] = sorted({final.name for _, final in stage.staged} | {"metrics.json", *also})
            files["metrics"] = stage.write_json("metrics.json", self.metrics)
        return {k: str(v) for k, v in files.items()}


class MatchStopped(Exception):
    """A stop was requested before the network had answered: there is no result to keep."""


def foreground_mask(normalized: np.ndarray) -> np.ndarray:
    """Otsu foreground of a [0, 1] volume (D, H, W)."""
    image = sitk.GetImageFromArray(normalized.astype(np.float32))
    return sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1)).astype(bool)


def match_pair(fixed: ImageLike, moving: ImageLike, model=None, device: str = "auto", preset: str = "auto",
               spacing_mm: Optional[float] = None, max_size: Optional[int] = None,
               max_field_voxels: int = DEFAULT_MAX_FIELD_VOXELS, progress=None,
               refine_iters: Optional[int] = None, similarity: str = "lncc",
               time_budget_s: Optional[float] = None, precision: str = "auto",
               refine_tolerance: Optional[float] = None,
               stop: Optional[Callable[[], bool]] = None,
               refine_detail: Optional[str] = None) -> MatchResult:
    """Match ``moving`` onto ``fixed`` (SimpleITK images or file paths) with a GVSL model
    (a module, a checkpoint path, or None for the shipped demo model), then refine the
    network's answer on the pair itself (:mod:`gvsl.refine`; ``refine_iters=0`` keeps the
    network's answer, None uses the default schedule).

    ``spacing_mm`` and ``max_size`` default to the grid the model was trained on (its
    checkpoint's spacing and patch size), so the network sees what it learned from; for
    weights without that record (the official ones) they default to 1 mm and 128.

    ``refine_detail`` caps the refinement's finest level (``gvsl.refine.DETAIL_MAX_VOXELS``):
    ``full`` (about 8 M voxels: a 1 mm brain at its own voxel size) or ``fast`` (about 1 M:
    that brain at about 2 mm, 6-10x sooner); smaller scans are refined at their own voxel size.
    None keeps ``RefineOptions.max_voxels`` (full, unless an experiment changed it).

    ``stop()`` (polled between stages and before every refinement step) returning True ends
    the match early: before the network has answered it raises :class:`MatchStopped`;
    during refinement the result keeps what refinement reached, as a time budget does."""
    from .checkpoint import load_model
    from .refine import DETAIL_MAX_VOXELS, SIMILARITIES, RefineOptions, refine_mapping
    from .runtime import pick_device, resolve_precision

    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
    options = RefineOptions(similarity=similarity, time_budget_s=time_budget_s, stop=stop)
    stopped = stop or (lambda: False)
    if refine_iters is not None:
        if refine_iters < 0:
            raise ValueError(f"refine_iters must be 0 (network only) or more, got {refine_iters}")
        options.iterations = int(refine_iters)
    if refine_tolerance is not None:
        if not refine_tolerance >= 0:
            raise ValueError(f"refine_tolerance must be 0 (run every step) or more, got {refine_tolerance}")
        options.tolerance = float(refine_tolerance)
    if refine_detail is not None:
        if refine_detail not in DETAIL_MAX_VOXELS:
            raise ValueError(f"unknown refine_detail {refine_detail!r}; choose one of {', '.join(DETAIL_MAX_VOXELS)}")
        options.max_voxels = DETAIL_MAX_VOXELS[refine_detail]
    detail = next((name for name, cap in DETAIL_MAX_VOXELS.items() if cap == options.max_voxels),
                  f"at most {options.max_voxels} voxels")
    say = progress or (lambda stage, fraction: None)
    seconds = {}
    t0 = time.perf_counter()
    names = [str(fixed) if not isinstance(fixed, sitk.Image) else "fixed image",
             str(moving) if not isinstance(moving, sitk.Image) else "moving image"]
    fixed_image = _as_image(fixed, names[0])
    moving_image = _as_image(moving, names[1])
    dev = pick_device(device)
    if model is None or isinstance(model, (str, Path)):
        path = model or default_checkpoint()
        model = load_model(path)
    chosen = resolve_precision(dev, precision)
    model = chosen.prepare(model.to(dev).eval())
    trained = training_grid(model)
    spacing_mm = trained["spacing"] if spacing_mm is None else spacing_mm
    max_size = trained["max_size"] if max_size is None else max_size
    fixed_norm, fixed_preset = normalized_image(fixed_image, preset)
    moving_norm, moving_preset = normalized_image(moving_image, preset)
    fixed_grid, moving_grid = fitting_grid([fixed_image, moving_image], spacing_mm, max_size, names=names)
    fixed_w = sitk.GetArrayFromImage(resample_to(fixed_norm, fixed_grid))
    moving_w = sitk.GetArrayFromImage(resample_to(moving_norm, moving_grid))
    seconds["load_resample"] = time.perf_counter() - t0
    if stopped():
        raise MatchStopped("stopped before the network ran")
    say("network", 0.2)

    t0 = time.perf_counter()
    a = torch.from_numpy(fixed_w)[None, None].to(dev)
    b = torch.from_numpy(moving_w)[None, None].to(dev)
    try:
        with chosen.inference():
            out = model(a, b, restore=False)
    except (RuntimeError, MemoryError) as exc:
        if "memory" in str(exc).lower():
            raise MemoryError(f"the {fixed_grid.shape} working grid does not fit in {dev} memory; "
                              f"lower --max-size (now {max_size}) or use a coarser --spacing") from exc
        raise
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds["network"] = time.perf_counter() - t0

    features = descriptor_features(out)
    voxel_affine = out.affine[0].double().cpu().numpy()
    local = (out.flow - out.affine_flow).float().cpu()
    warped_w = out.warped[0, 0].float().cpu().numpy()
    voxel = voxel_affine_to_matrix(voxel_affine, fixed_grid.shape)
    # The fused field is A(p + u(p)) (conventions.compose_affine_then_local): u is the local part.
    network = Mapping(affine=moving_grid.voxel_to_physical() @ voxel @ fixed_grid.physical_to_voxel(),
                      local=voxel_flow_to_lps(out.local_flow.float().cpu(), fixed_grid), grid=fixed_grid)

    refinement = {"iterations": 0, "similarity": similarity, "detail": detail, "seconds": 0.0}
    final = network
    if options.iterations > 0:
        say("refine", 0.35)
        final, refine_report = refine_mapping(
            fixed_norm, moving_norm, network, options, dev,
            progress=lambda stage, fraction: say(stage, 0.35 + 0.45 * fraction))
        refinement.update(refine_report.to_json())
        seconds["refine"] = refine_report.seconds
    say("fields", 0.8)

    t0 = time.perf_counter()
    result = MatchResult(fixed_image, moving_image, fixed_grid, moving_grid, voxel_affine, local,
                         final, network, None, None, None, None, {}, features, fixed_w, moving_w, warped_w)
    result.affine_transform = _itk_affine(final.affine)
    field_grid = Grid.of(fixed_image).coarsened(max_field_voxels)
    result.displacement = displacement_image(final, field_grid)
    result.warped = warped_image(final, moving_image, fixed_image)
    result.jacobian = jacobian_image(final, field_grid)
    seconds["fields"] = time.perf_counter() - t0

    # Quality on the fixed working grid, the same measure for every stage.
    t0 = time.perf_counter()
    moving_norm_t = torch.from_numpy(sitk.GetArrayFromImage(moving_norm))[None, None]
    moving_norm_grid = Grid.of(moving_norm)

    def on_fixed_working(mapping: Mapping) -> np.ndarray:
        return _assemble(mapping.warp_slabs(fixed_grid, moving_norm_t, moving_norm_grid), fixed_grid.shape)

    mask = torch.from_numpy(foreground_mask(fixed_w))[None, None]
    target = torch.from_numpy(fixed_w)[None, None]
    ncc = LocalNCCLoss(9)

    def local_ncc(arr):
        return float(1.0 - ncc(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None], target, mask))

    moving_on_fixed = on_fixed_working(Mapping(np.eye(4)))
    stages = {"before": local_ncc(moving_on_fixed),
              "network_affine": local_ncc(on_fixed_working(Mapping(network.affine))),
              "network": local_ncc(on_fixed_working(network))}
    if final is not network:
        result.warped_working = on_fixed_working(final)
        stages["refined_affine"] = local_ncc(on_fixed_working(Mapping(final.affine)))
        stages["refined"] = local_ncc(result.warped_working)
    start_best = max(stages["before"], stages["network"])
    after = stages.get("refined", stages["network"])
    warning = None
    if after < start_best - 1e-3:
        warning = (f"the {'refined' if final is not network else 'network'} match is less similar than "
                   f"{'no registration' if stages['before'] >= stages['network'] else 'the network'} "
                   f"(local NCC {after:.3f} < {start_best:.3f}): check the result before using it")
    refinement["improved"] = bool(final is not network and stages["refined"] > stages["network"])
    refinement["warning"] = warning

    jac_local = final.jacobian_on_local_grid() if final.local is not None else None
    jac = sitk.GetArrayViewFromImage(result.jacobian)
    seconds["quality"] = time.perf_counter() - t0
    result.moving_on_fixed_working = moving_on_fixed
    result.metrics = {
        "local_ncc_before": stages["before"],
        "local_ncc_affine": stages.get("refined_affine", stages["network_affine"]),
        "local_ncc_network": stages["network"],
        "local_ncc_after": after,
        "local_ncc_stages": stages,
        "ncc_note": "mean squared local NCC (9^3 window) inside the fixed image's Otsu foreground, on the "
                    "network's working grid; 'affine' is the final answer's affine part",
        "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max()), "jacobian_mean": float(jac.mean()),
        "folding_fraction": float((jac_local <= 0).float().mean()) if jac_local is not None else float(jac.min() <= 0),
        "folding_note": "fraction of the local field's own grid where det(dT/dx) <= 0",
        "affine_matrix_lps": final.affine.tolist(),
        "network_affine_matrix_lps": network.affine.tolist(),
        "refinement": refinement,
        "working_grid": {"shape_dhw": list(fixed_grid.shape), "spacing_mm": fixed_grid.spacing[0],
                         "capped": bool(fixed_grid.spacing[0] > spacing_mm + 1e-9)},
        "field_grid": field_grid.to_json(),
        "device": str(dev), "precision": chosen.as_dict(),
        "presets": {"fixed": fixed_preset, "moving": moving_preset},
        "seconds": seconds,
    }
    say("done", 1.0)
    return result


def _itk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform


def _assemble(slabs, shape, components: int = 0, dtype=np.float32) -> np.ndarray:
    out = np.empty(tuple(shape) + ((components,) if components else ()), dtype=dtype)
    for d0, d1, values in slabs:
        out[d0:d1] = values.numpy()
    return out


# float32 vectors resolve a displacement of size |u| to about |u| * 2^-24: where that is
# coarser than this, the field is written as float64 (images far apart, e.g. an origin of 1e8 mm).
DISPLACEMENT_RESOLUTION_MM = 0.01


def displacement_image(mapping: Mapping, grid: Grid) -> sitk.Image:
    """ITK displacement field (LPS mm) of the whole mapping on ``grid``: float32 vectors, or
    float64 where float32 could not hold them to ``DISPLACEMENT_RESOLUTION_MM``."""
    wide = mapping.displacement_bound(grid) * 2.0 ** -24 > DISPLACEMENT_RESOLUTION_MM
    dtype = (torch.float64, np.float64) if wide else (torch.float32, np.float32)
    image = sitk.GetImageFromArray(_assemble(mapping.displacement_slabs(grid, dtype=dtype[0]), grid.shape, 3,
                                             dtype=dtype[1]), isVector=True)
    return grid.apply_to(image)


def warped_image(mapping: Mapping, moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """The moving image sampled (trilinear, in torch) on the fixed image's own grid;
    outside the moving image reads as its minimum (background)."""
    view = sitk.GetArrayViewFromImage(moving)
    background = float(view.min())
    # Shifted so that background is 0 (what zeros padding reads outside), in one pass over
    # the view: no float32 copy of the moving image on top (0.6 GB for a 512x512x600 CT).
    shifted = torch.from_numpy(np.subtract(view, background, dtype=np.float32))[None, None]
    grid = Grid.of(fixed)
    warped = _assemble(mapping.warp_slabs(grid, shifted, Grid.of(moving)), grid.shape)
    warped += np.float32(background)
    image = sitk.GetImageFromArray(warped)
    image.CopyInformation(fixed)
    return image


def jacobian_image(mapping: Mapping, grid: Grid) -> sitk.Image:
    """det(dT/dx) on ``grid`` (see :meth:`Mapping.jacobian_slabs`)."""
    return grid.apply_to(sitk.GetImageFromArray(_assemble(mapping.jacobian_slabs(grid), grid.shape)))


def jacobian_determinant(displacement: sitk.Image) -> sitk.Image:
    """det(I + du/dx) of any ITK displacement field, with derivatives in physical (LPS)
    space. ITK's DisplacementFieldJacobianDeterminantFilter uses spacing but ignores the
    direction matrix, which is wrong for flipped or oblique grids (e.g. CTChest4)."""
    grid = Grid.of(displacement)
    u = torch.from_numpy(sitk.GetArrayFromImage(displacement).astype(np.float32))  # (D, H, W, 3)
    det = local_jacobian_determinant(u.permute(3, 0, 1, 2)[None], grid)
    image = sitk.GetImageFromArray(det.numpy())
    image.CopyInformation(displacement)
    return image


# ----------------------------------------------------------------------------- CLI


POINT_SPACES = ("LPS", "RAS")
# Slicer's markups fiducial CSV: "# CoordinateSystem = RAS|LPS", or 0 (RAS) / 1 (LPS) in older files.
FCSV_SPACES = {"RAS": "RAS", "LPS": "LPS", "0": "RAS", "1": "LPS"}


def _point_space(value, where: str) -> str:
    space = str(value).strip().upper()
    if space not in POINT_SPACES:
        raise InputError(f"{where}: unknown coordinate space {value!r}; use \"LPS\" (files, ITK) or \"RAS\" (Slicer)")
    return space


def _json_coordinates(value, where: str) -> np.ndarray:
    """Three plain JSON numbers (not booleans, not strings)."""
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise InputError(f"{where}: coordinates {value!r} are not numbers (expected [x, y, z])")
    return np.asarray(value, dtype=float).reshape(-1)


def _read_json_points(path: Path, text: str) -> List[dict]:
    from .conventions import ras_to_lps
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    space = "LPS"
    if isinstance(items, dict) and "points" in items:
        space = _point_space(items.get("space", "LPS"), f"{path}: \"space\"")
        items = items["points"]
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a JSON list of points, or {{\"space\": ..., \"points\": [...]}}")
    points = []
    for k, item in enumerate(items):
        where = f"item {k + 1}"
        if isinstance(item, (list, tuple)):
            item = {"point": item}
        if not isinstance(item, dict) or "point" not in item:
            raise InputError(f"{path} {where}: expected {{\"point\": [x, y, z]}} or [x, y, z]")
        p = _json_coordinates(item["point"], f"{path} {where}")
        if _point_space(item.get("space", space), f"{path} {where}") == "RAS" and p.size == 3:
            p = ras_to_lps(p)
        points.append({"point": p.tolist(), "image": item.get("image", "fixed"), "where": where})
    return points


def _number(text: str, decimal_comma: bool) -> float:
    if decimal_comma:
        text = text.replace(",", ".")
    return float(text)


def _read_csv_points(path: Path, text: str) -> List[dict]:
    """Rows ``x,y,z[,image]`` (LPS) with an optional header; ``;`` or tab separators (with
    decimal commas after ``;``); Slicer's ``.fcsv`` (``# CoordinateSystem`` comment, columns
    id,x,y,z,...)."""
    from .conventions import ras_to_lps
    lines = text.splitlines()
    fcsv = path.suffix.lower() == ".fcsv" or any(ln.startswith("# Markups fiducial file") for ln in lines[:3])
    space, columns = "LPS", None
    if fcsv:
        space = "RAS"  # Slicer's default before files said otherwise
        for ln in lines:
            if not ln.startswith("#"):
                continue
            key, _, value = ln[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                if value.strip().upper() not in FCSV_SPACES:
                    raise InputError(f"{path}: unknown CoordinateSystem {value.strip()!r} (expected RAS, LPS, 0 or 1)")
                space = FCSV_SPACES[value.strip().upper()]
            elif key.strip().lower() == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
    data_lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    delimiter = ","
    if data_lines and not fcsv:
        sample = data_lines[0]
        if ";" in sample:
            delimiter = ";"
        elif "\t" in sample and "," not in sample:
            delimiter = "\t"
    decimal_comma = delimiter == ";"
    first = 1 if fcsv else 0  # an .fcsv row starts with its id
    if columns and all(c in columns for c in ("x", "y", "z")):
        first = columns.index("x")
    points, seen_data = [], False
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
            continue
        where = f"row {number}"
        values = [v.strip() for v in row]
        numeric = []
        for v in values[first:first + 3]:
            try:
                numeric.append(_number(v, decimal_comma))
            except ValueError:
                break
        if not seen_data and len(numeric) == 0:
            continue  # a header line such as "x,y,z,image"
        seen_data = True
        if len(numeric) < 3:
            got = len(numeric) if len(numeric) == len(values[first:first + 3]) else f"{values[first:first + 3]!r}"
            raise InputError(f"{path} {where}: needs 3 numbers x,y,z{'' if fcsv else '[,image]'}, got {got}")
        point = ras_to_lps(numeric).tolist() if space == "RAS" else numeric
        image = "fixed" if fcsv else (values[3] if len(values) > 3 else "fixed") or "fixed"
        points.append({"point": point, "image": image, "where": where})
    return points


def read_points(path, grids: Optional[dict] = None) -> List[dict]:
    """Query points, LPS mm unless the file says otherwise:

    * CSV rows ``x,y,z[,image]`` (optional header; ``;`` or tab separators also work);
    * Slicer's markups ``.fcsv`` (in the ``# CoordinateSystem`` it declares, RAS or LPS);
    * JSON ``[{"point": [x,y,z], "image": ...}]`` or ``{"space": "RAS", "points": [...]}``
      (``"space"`` per item too: "LPS" or "RAS", for Slicer coordinates).

    Each point must have three finite coordinates and, given ``grids`` ({"fixed": Grid,
    "moving": Grid}, e.g. from :func:`gvsl.data.image_grid`), lie inside the image it is
    placed on; a file that gives no point is refused. Errors name the CSV row or JSON item."""
    from .data import check_points
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: points file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read points ({exc})") from None
    if path.suffix.lower() == ".json":
        points = _read_json_points(path, text)
    else:
        points = _read_csv_points(path, text)
    if not points:
        what = "is empty" if not text.strip() else "holds no point"
        raise InputError(f"{path}: {what}; expected rows x,y,z[,image] (LPS mm), a Slicer .fcsv, or a JSON list "
                         f"of points")
    checked = check_points(points, grids or {}, str(path))
    return [{"point": p["point"], "image": p["image"]} for p in checked]


def summary_line(m: dict) -> str:
    stages = m["local_ncc_stages"]
    text = f"local NCC before {stages['before']:.3f} -> network {stages['network']:.3f}"
    if "refined" in stages:
        r = m["refinement"]
        text += (f" -> refined {stages['refined']:.3f} ({r['iterations']} steps, {r['similarity']}, "
                 f"start: {r['start']}, {r['seconds']:.1f} s{', time budget reached' if r.get('stopped_by_time_budget') else ''}"
                 f"{', stopped on request' if r.get('stopped_by_request') else ''})")
    return (text + f"; folding {100 * m['folding_fraction']:.3f} %; working grid {m['working_grid']['shape_dhw']} "
            f"at {m['working_grid']['spacing_mm']:.2f} mm")


# What `gvsl match` writes; a result folder from before metrics.json listed its "outputs"
# is cleaned by these names (and only when its metrics.json says it is a match result).
_MATCH_OUTPUT = re.compile(r"(affine\.tfm|(network_)?displacement\.nii\.gz|warped\.nii\.gz|jacobian\.nii\.gz|"
                           r"heatmap_\d+\.nii\.gz|points\.json|report\.png|metrics\.json|state\.npz|"
                           r"residual_displacement\.nrrd|warped\.nrrd|jacobian\.nrrd)")


def previous_outputs(out) -> List[str]:
    """The files an earlier ``gvsl match`` wrote into ``out`` (names only)."""
    metrics = Path(out) / "metrics.json"
    try:
        previous = json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict) or "local_ncc_stages" not in previous:
        return []  # not a match result: touch nothing
    listed = previous.get("outputs")
    if isinstance(listed, list):
        names = [n for n in listed if isinstance(n, str)]
    else:
        names = [p.name for p in Path(out).iterdir() if p.is_file()]
    return sorted(n for n in names if _MATCH_OUTPUT.fullmatch(n) and (Path(out) / n).is_file())


def remove_previous_outputs(out, previous: Sequence[str], kept: Sequence[str], log) -> List[str]:
    """Remove what the previous result had and this one does not (its points.json,
    heatmaps, report, state): the folder then holds one result, not a mix of two."""
    removed = []
    for name in previous:
        if name not in kept:
            try:
                (Path(out) / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        log(f"removed {len(removed)} file(s) of the previous result in {out} that this one does not have: "
            f"{', '.join(removed[:8])}{' ...' if len(removed) > 8 else ''}")
    return removed


def match_cli(args):
    from .data import image_grid
    from .runtime import Reporter, StopFlag, error_events
    from .safe_io import RunLock, check_writable_folder, remove_stale_temporaries
    reporter = Reporter(args.progress)
    with error_events(reporter), StopFlag() as stop:
        reporter.event("start", step=0, total=4)
        # Everything that can be checked cheaply is checked before the network runs: the
        # output folder, the images' headers and the query points on them.
        log = lambda message: reporter.event("log", message=message)  # noqa: E731
        with RunLock(args.out, "gvsl match", log=log):
            check_writable_folder(args.out)
            remove_stale_temporaries(args.out, log=log)
            grids = {"fixed": image_grid(args.fixed), "moving": image_grid(args.moving)}
            points = read_points(args.points, grids) if args.points else []

            def progress(stage, fraction):
                reporter.event("progress", step=int(fraction * 3), total=4, stage=stage, loss={}, eta_s=0.0)

            previous = previous_outputs(args.out)
            try:
                result = match_pair(args.fixed, args.moving, args.checkpoint, device=args.device,
                                    preset=args.preset, spacing_mm=args.spacing, max_size=args.max_size,
                                    progress=progress, refine_iters=args.refine_iters, similarity=args.similarity,
                                    time_budget_s=args.time_budget, precision=args.precision,
                                    refine_tolerance=getattr(args, "refine_tolerance", None), stop=lambda: stop.requested,
                                    refine_detail=getattr(args, "refine_detail", "full"))
            except MatchStopped as exc:  # nothing to keep: exit 0, as a stopped training run does
                reporter.event("done", stopped=True, files={}, message=str(exc))
                return
            files = result.save(args.out, points, report=not args.no_report,
                                also=("state.npz", RESIDUAL_FILE, *PANEL_IMAGE_FILES.values())
                                if args.save_state else ())
            if args.save_state:
                from .safe_io import StagedFiles
                files["state"] = str(result.save_state(Path(args.out) / "state.npz"))
                with StagedFiles(Path(args.out)) as stage:
                    files["residual"] = str(stage.write_image(RESIDUAL_FILE, result.residual_displacement()))
                    for key, name in PANEL_IMAGE_FILES.items():
                        files[f"panel_{key}"] = str(stage.write_image(name, getattr(result, key)))
            remove_previous_outputs(args.out, previous, result.metrics["outputs"], log)
        reporter.event("progress", step=4, total=4, stage="export", loss={}, eta_s=0.0)
        print(summary_line(result.metrics), flush=True)
        if result.metrics["refinement"].get("warning"):
            print(f"warning: {result.metrics['refinement']['warning']}", file=sys.stderr, flush=True)
        reporter.event("done", files=files, stopped=bool(result.metrics["refinement"].get("stopped_by_request")),
                       metrics={k: v for k, v in result.metrics.items() if k != "field_grid"})
