"""Registration benchmark: GVSL (network only, refined) against ANTs SyN and elastix, side by side.

Every pair comes from data that ships in packages (``benchmarks/datasets.py``): each source
under known random affine + B-spline transforms (several seeds), plus a cross-subject pair.
For each pair, in one run and on the same CPU threads:

* ``gvsl network``  - ``gvsl.match_pair(..., refine_iters=0)``, the shipped model alone
* ``gvsl refined``  - ``gvsl.match_pair(...)`` with its default refinement (``refine_detail="full"``)
* ``gvsl fast``      - the same with ``refine_detail="fast"`` (finest level at most ~1 M voxels)
* ``ants SyN``      - ``antspyx`` ``ants.registration(type_of_transform="SyN")`` (its defaults)
* ``elastix``       - ``itk-elastix`` default ``affine`` + ``bspline`` parameter maps

Measures, the same code for every method: mean Dice over the labels present in the fixed
image, mean 95th-percentile Hausdorff distance (mm), folding (% of fixed-foreground voxels
where the Jacobian determinant of the exported displacement field is <= 0, computed by
``gvsl.match.jacobian_determinant`` in physical space) and wall seconds.

Install the peers and data first (not needed by the product or its tests)::

    pip install antspyx itk-elastix slicerio nilearn
    apt-get install mricron-data insighttoolkit5-examples invesalius-examples

Run::

    python benchmarks/registration.py                 # every installed source, seeds 0 1
    python benchmarks/registration.py --sources chest_ct --seeds 0 --methods gvsl-refined ants
    python benchmarks/registration.py --native --sources mni152 colin27 invesalius_head_ct \
        --methods gvsl-refined gvsl-fast ants       # 1 mm brains, the head CT at 0.96 x 0.96 x 1.5 mm
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402

METHODS = ("gvsl-network", "gvsl-refined", "gvsl-fast", "ants", "elastix")


# ----------------------------------------------------------------------- measures


def dice_and_hd95(warped_labels: sitk.Image, fixed_labels: sitk.Image, label_ids):
    """Mean Dice and mean HD95 (mm) over labels present in the fixed labels."""
    warped = sitk.GetArrayFromImage(warped_labels)
    fixed = sitk.GetArrayFromImage(fixed_labels)
    dices, hds = [], []
    for label in label_ids:
        f, w = fixed == label, warped == label
        if not f.any():
            continue
        dices.append(2.0 * np.logical_and(f, w).sum() / (f.sum() + w.sum()))
        hds.append(hd95(f, w, fixed_labels) if w.any() else np.nan)
    return float(np.mean(dices)), float(np.nanmean(hds)) if np.isfinite(hds).any() else float("nan")


def hd95(a: np.ndarray, b: np.ndarray, reference: sitk.Image) -> float:
    """Symmetric 95th-percentile surface distance (mm) between two masks on ``reference``'s grid."""
    def surface_and_distance(mask):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(reference)
        surface = sitk.GetArrayFromImage(sitk.LabelContour(image)) > 0
        distance = np.abs(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)))
        return surface, distance
    surface_a, distance_a = surface_and_distance(a)
    surface_b, distance_b = surface_and_distance(b)
    distances = np.concatenate([distance_b[surface_a], distance_a[surface_b]])
    return float(np.percentile(distances, 95)) if distances.size else float("nan")


def folding_percent(displacement: sitk.Image, fixed: sitk.Image) -> float:
    from gvsl.match import jacobian_determinant
    field = sitk.Resample(sitk.Cast(displacement, sitk.sitkVectorFloat64), fixed, sitk.Transform(),
                          sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    jac = sitk.GetArrayFromImage(jacobian_determinant(field))
    foreground = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.Cast(fixed, sitk.sitkFloat32), 0, 1)) > 0
    return 100.0 * float((jac[foreground] <= 0).mean())


def warp_labels(labels: sitk.Image, fixed: sitk.Image, displacement: sitk.Image) -> sitk.Image:
    tx = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    return sitk.Resample(labels, fixed, tx, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


# ------------------------------------------------------------------------ methods


CHECKPOINT = None  # --checkpoint: another model than the shipped one


def run_gvsl(pair, workdir: Path, refine: bool, detail=None):
    from gvsl.match import match_pair
    preset = "ct" if pair.modality == "CT" else "mr"
    t0 = time.perf_counter()
    result = match_pair(pair.fixed, pair.moving, CHECKPOINT, device="cpu", preset=preset,
                        refine_iters=None if refine else 0, refine_detail=detail)
    seconds = time.perf_counter() - t0
    refinement = result.metrics["refinement"]
    info = {"refinement_start": refinement.get("start"), "warning": refinement.get("warning"),
            "stage_seconds": {k: round(float(v), 3) for k, v in result.metrics.get("seconds", {}).items()},
            "refine_levels": [{"stage": level.get("stage"), "shape_dhw": level.get("shape_dhw"),
                               "steps": level.get("steps", level.get("steps_each")),
                               "seconds": round(float(level.get("seconds", 0.0)), 3)}
                              for level in refinement.get("levels", [])]}
    return result.displacement, seconds, info


def run_ants(pair, workdir: Path):
    import ants
    paths = {}
    for name in ("fixed", "moving"):
        paths[name] = str(workdir / f"{name}.nii.gz")
        sitk.WriteImage(sitk.Cast(getattr(pair, name), sitk.sitkFloat32), paths[name])
    fixed, moving = ants.image_read(paths["fixed"]), ants.image_read(paths["moving"])
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(workdir / "ants_"))
    composed = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], compose=str(workdir / "ants_composed_"))
    seconds = time.perf_counter() - t0
    return sitk.ReadImage(composed, sitk.sitkVectorFloat64), seconds, {}


def run_elastix(pair, workdir: Path):
    import itk
    fixed = itk.imread(_write(pair.fixed, workdir / "fixed.nii.gz"), itk.F)
    moving = itk.imread(_write(pair.moving, workdir / "moving.nii.gz"), itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    t0 = time.perf_counter()
    _, transform_parameters = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                              log_to_console=False, output_directory=str(workdir))
    field = itk.transformix_deformation_field(moving, transform_parameters, output_directory=str(workdir))
    seconds = time.perf_counter() - t0
    itk.imwrite(field, str(workdir / "elastix_field.nii.gz"))
    return sitk.ReadImage(str(workdir / "elastix_field.nii.gz"), sitk.sitkVectorFloat64), seconds, {}


def _write(image, path: Path) -> str:
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(path))
    return str(path)


def evaluate(pair, method: str):
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if method == "gvsl-network":
            displacement, seconds, info = run_gvsl(pair, workdir, refine=False)
        elif method == "gvsl-refined":
            displacement, seconds, info = run_gvsl(pair, workdir, refine=True)
        elif method == "gvsl-fast":
            displacement, seconds, info = run_gvsl(pair, workdir, refine=True, detail="fast")
        elif method == "ants":
            displacement, seconds, info = run_ants(pair, workdir)
        else:
            displacement, seconds, info = run_elastix(pair, workdir)
    label_ids = sorted(pair.label_names)
    dice, hd = dice_and_hd95(warp_labels(pair.moving_labels, pair.fixed, displacement), pair.fixed_labels, label_ids)
    return {"pair": pair.name, "method": method, "dice": dice, "hd95_mm": hd,
            "folding_percent": folding_percent(displacement, pair.fixed), "seconds": seconds, **info}


def before_row(pair):
    identity = sitk.Resample(pair.moving_labels, pair.fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             pair.moving_labels.GetPixelID())
    dice, hd = dice_and_hd95(identity, pair.fixed_labels, sorted(pair.label_names))
    return {"pair": pair.name, "method": "before", "dice": dice, "hd95_mm": hd, "folding_percent": 0.0, "seconds": 0.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", nargs="*", default=None, help="default: every installed source")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-cross-subject", action="store_true")
    parser.add_argument("--brain-spacing", type=float, default=2.0)
    parser.add_argument("--native", action="store_true",
                        help="every source at its own voxel size (brains 1 mm, the head CT 0.96 x 0.96 x 1.5 mm) "
                             "instead of the 2 mm brains and head CT")
    parser.add_argument("--json", default=None, help="also write every row here")
    parser.add_argument("--checkpoint", default=None, help="GVSL model to measure (default: the shipped one)")
    parser.add_argument("--refine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="change a gvsl.refine.RefineOptions default for this run (experiments), repeatable")
    parser.add_argument("--profile", action="store_true", help="print each GVSL row's stage and level seconds")
    args = parser.parse_args(argv)
    global CHECKPOINT
    CHECKPOINT = args.checkpoint
    if args.refine_option:
        import dataclasses
        import functools
        import gvsl.refine
        original = gvsl.refine.RefineOptions
        kinds = {f.name: f.type for f in dataclasses.fields(original)}
        overrides = {}
        for item in args.refine_option:
            key, _, value = item.partition("=")
            if key not in kinds:
                parser.error(f"--refine-option {item}: no such field ({', '.join(kinds)})")
            kind = kinds[key]
            overrides[key] = (int(value) if kind in ("int", int) else
                              value.lower() in ("1", "true", "yes") if kind in ("bool", bool) else float(value))
        # match_pair imports RefineOptions from gvsl.refine when it runs, so this takes effect there.
        gvsl.refine.RefineOptions = functools.partial(original, **overrides)
        print(f"refine options changed: {overrides}", flush=True)
    threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    print(f"threads: torch {__import__('torch').get_num_threads()}, ITK {threads or 'default'}", flush=True)

    spacing = ({} if args.native else
               {"mni152": args.brain_spacing, "colin27": args.brain_spacing, "invesalius_head_ct": 2.0})
    names = args.sources if args.sources is not None else datasets.available_sources(verbose=True)
    pairs = []
    for name in names:
        pairs += datasets.known_transform_pairs(datasets.load_source(name, spacing.get(name)), args.seeds)
    if not args.no_cross_subject:
        pairs += datasets.cross_subject_pairs(None if args.native else args.brain_spacing)

    rows = []
    header = f"| {'pair':28s} | {'method':13s} | {'Dice':>6s} | {'HD95 mm':>7s} | {'folding %':>9s} | {'seconds':>7s} |"
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
    for pair in pairs:
        for method in ["before"] + args.methods:
            try:
                row = before_row(pair) if method == "before" else evaluate(pair, method)
            except Exception as exc:  # a peer that fails on one pair must not end the run
                row = {"pair": pair.name, "method": method, "dice": float("nan"), "hd95_mm": float("nan"),
                       "folding_percent": float("nan"), "seconds": float("nan"), "error": str(exc)[:200]}
            rows.append(row)
            note = f" {row['warning']}" if row.get("warning") else (f" error: {row['error']}" if row.get("error") else "")
            print(f"| {pair.name:28s} | {method:13s} | {row['dice']:6.3f} | {row['hd95_mm']:7.2f} | "
                  f"{row['folding_percent']:9.3f} | {row['seconds']:7.1f} |{note}", flush=True)
            if args.profile and row.get("stage_seconds"):
                print("    stages: " + ", ".join(f"{k} {v:.2f}" for k, v in row["stage_seconds"].items()))
                for level in row.get("refine_levels", []):
                    print(f"    {level['stage']:10s} {str(level['shape_dhw']):16s} steps {level['steps']} "
                          f"{level['seconds']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
