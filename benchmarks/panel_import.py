"""Main-thread cost of importing a ``gvsl match`` result into the Slicer scene.

When a background Match pair finishes, the panel calls ``GVSLLogic.importMatchFolder`` on
Qt's main thread: Slicer is frozen for as long as it takes. This benchmark writes a
synthetic result folder with the files ``gvsl match --save-state`` writes for a pair of
the given size (metrics.json, residual_displacement.nrrd on the moving grid coarsened to
4 M voxels, warped.nrrd on the fixed grid and jacobian.nrrd on the field grid coarsened
to 16.7 M voxels, uncompressed, and the .nii.gz files the panel does not read), then imports it
in a fresh interpreter on slicer-core's MRML (as Slicer's main thread would, without Qt)
and prints a table: per-file read times, the whole import, and whether torch got imported.

Goal: under 1 s for 256x256x300 and under 2 s for 512x512x600.

    python benchmarks/panel_import.py                  # 256x256x300
    python benchmarks/panel_import.py --size 512x512x600
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "GVSLExtension"), str(REPO / "GVSLModule")]

CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
sys.path[:0] = [{ext!r}, {mod!r}]
import numpy as np, SimpleITK as sitk, slicer
from GVSLModuleLib import mrml_io
from GVSLModuleLib.logic import GVSLLogic, PANEL_IMAGE_FILES, RESIDUAL_FILE
folder = {folder!r}
t_imports = time.perf_counter() - t_start
scene = slicer.vtkMRMLScene()
nodes = []
for name in ("fixed", "moving"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    mrml_io.update_volume_from_image(node, sitk.ReadImage(folder + "/" + name + ".nrrd"))
    nodes.append(node)
reads = {{}}
for name in ("metrics.json", RESIDUAL_FILE, *PANEL_IMAGE_FILES.values(), "warped.nii.gz", "jacobian.nii.gz",
             "displacement.nii.gz"):
    t0 = time.perf_counter()
    if name.endswith(".json"):
        json.loads(open(folder + "/" + name, encoding="utf-8").read())
    else:
        sitk.ReadImage(folder + "/" + name)
    reads[name] = time.perf_counter() - t0
logic = GVSLLogic(scene)
t0 = time.perf_counter()
result = logic.importMatchFolder(folder, *nodes)
t_import = time.perf_counter() - t0
print(json.dumps({{"reads": reads, "import": t_import, "module_imports": t_imports,
                  "torch_imported": "torch" in sys.modules, "features_loaded": logic.lastMatch.loaded}}))
"""


def write_folder(folder: Path, size):
    import numpy as np
    import SimpleITK as sitk
    from gvsl.conventions import Grid
    from gvsl.match import DEFAULT_MAX_FIELD_VOXELS, PANEL_IMAGE_FILES, RESIDUAL_FILE, RESIDUAL_MAX_VOXELS
    from gvsl.safe_io import write_nifti_gz
    rng = np.random.default_rng(0)
    nx, ny, nz = size
    spacing, direction = (0.8, 0.8, 1.25), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

    def volume(seed_shift):
        array = (rng.normal(0, 200, (nz, ny, nx)) + seed_shift).astype(np.int16)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        image.SetOrigin((100.0, 120.0, -200.0))
        return image

    fixed, moving = volume(0), volume(50)
    sitk.WriteImage(fixed, str(folder / "fixed.nrrd"))
    sitk.WriteImage(moving, str(folder / "moving.nrrd"))

    def field(grid, components):
        shape = grid.shape + ((components,) if components > 1 else ())
        image = sitk.GetImageFromArray(rng.normal(0, 2, shape).astype(np.float32), isVector=components > 1)
        return grid.apply_to(image)

    residual_grid = Grid.of(moving).coarsened(RESIDUAL_MAX_VOXELS)
    field_grid = Grid.of(fixed).coarsened(DEFAULT_MAX_FIELD_VOXELS)
    sitk.WriteImage(field(residual_grid, 3), str(folder / RESIDUAL_FILE))
    warped = sitk.Cast(fixed, sitk.sitkFloat32)
    jacobian = field(field_grid, 1)
    write_nifti_gz(warped, folder / "warped.nii.gz")
    write_nifti_gz(jacobian, folder / "jacobian.nii.gz")
    sitk.WriteImage(warped, str(folder / PANEL_IMAGE_FILES["warped"]))
    sitk.WriteImage(jacobian, str(folder / PANEL_IMAGE_FILES["jacobian"]))
    write_nifti_gz(field(field_grid, 3), folder / "displacement.nii.gz")
    affine = np.eye(4)
    affine[:3, 3] = (2.0, -3.0, 4.0)
    metrics = {"affine_matrix_lps": affine.tolist(), "local_ncc_before": 0.4, "local_ncc_affine": 0.5,
               "local_ncc_after": 0.6, "folding_fraction": 0.0, "jacobian_min": 0.5, "jacobian_max": 1.5}
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return residual_grid, field_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x256x300", help="x,y,z voxels of both volumes")
    parser.add_argument("--folder", help="where to write the synthetic result (default: a temporary folder)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    folder = Path(args.folder or tempfile.mkdtemp(prefix="gvsl-import-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    residual_grid, field_grid = write_folder(folder, size)
    print(f"synthetic {args.size} result written to {folder} in {time.perf_counter() - t0:.1f} s "
          f"(residual grid {residual_grid.size}, field grid {field_grid.size})")
    code = CHILD.format(ext=str(REPO / "GVSLExtension"), mod=str(REPO / "GVSLModule"), folder=str(folder))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    if out.returncode != 0:
        sys.exit(out.stderr)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    goal = 1.0 if size[0] * size[1] * size[2] <= 256 * 256 * 300 else 2.0
    rows = [(f"read {name}" + ("  (not read by the import)" if name.endswith(".nii.gz") else ""), seconds)
            for name, seconds in report["reads"].items()]
    rows.append(("importMatchFolder (main thread), total", report["import"]))
    print(f"\n| {args.size} | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    print(f"\ntorch imported by the import: {report['torch_imported']}; features loaded: "
          f"{report['features_loaded']} (they load on the first heatmap query)")
    print(f"goal < {goal:.0f} s: {'met' if report['import'] < goal else 'NOT met'}")


if __name__ == "__main__":
    main()
