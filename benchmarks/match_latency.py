"""Match pair latency per stage (load/resample, network, head and fields, export) at
64³, 96³ and 128³ working grids, with the network stage's achieved GFLOP/s beside the
device's float32 matmul GFLOP/s. ``--big`` also matches a 512 x 512 x 600 CT and reports
the capped working grid and the peak memory.

    python benchmarks/match_latency.py --device cpu [--width 0.25] [--big]
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import count_flops, device_name, markdown_table, matmul_gflops  # noqa: E402

import gvsl  # noqa: E402
from gvsl.match import default_checkpoint, match_pair  # noqa: E402
from gvsl.runtime import pick_device  # noqa: E402
from gvsl.samples import chest_ct, deformed_copy, random_deformation  # noqa: E402


def ct_on_grid(ct, size_xyz, spacing):
    """The sample CT resampled onto an isotropic grid of ``size_xyz`` voxels."""
    centre = np.asarray(ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()]))
    origin = centre - (np.asarray(size_xyz) - 1) / 2 * np.asarray(spacing)
    return sitk.Resample(ct, [int(s) for s in size_xyz], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         spacing, np.eye(3).ravel().tolist(), -1024.0, sitk.sitkFloat32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=float, default=None, help="random-init model of this width (default: shipped model)")
    p.add_argument("--sizes", default="64,96,128")
    p.add_argument("--big", action="store_true")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model = gvsl.GVSL(width=args.width) if args.width else gvsl.load_model(default_checkpoint())
    model = model.to(device).eval()
    ct, _, _ = chest_ct()
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        spacing = 384.0 / n  # the CT's field of view at n voxels
        fixed = ct_on_grid(ct, (n, n, n), (spacing,) * 3)
        moving, _ = deformed_copy(fixed, None, random_deformation(fixed, seed=1))
        match_pair(fixed, moving, model, device=str(device), spacing_mm=spacing, max_size=n)  # warm-up
        result = match_pair(fixed, moving, model, device=str(device), spacing_mm=spacing, max_size=n)
        with tempfile.TemporaryDirectory() as tmp:
            result.save(tmp, report=False)
        s = result.metrics["seconds"]
        centre = result.fixed_grid.physical_bounds_center()
        result.heatmap(centre, on_image_grid=False)
        t0 = time.perf_counter()
        for k in range(10):
            result.heatmap(centre + k, on_image_grid=False)
        heat_ms = (time.perf_counter() - t0) / 10 * 1000
        shape = result.metrics["working_grid"]["shape_dhw"]
        x = torch.rand(1, 1, *shape, device=device)
        with torch.no_grad():
            flops = count_flops(lambda: model(x, x, restore=False))
        rows.append([f"{'x'.join(map(str, shape))}", f"{s['load_resample']:.3f}", f"{s['network']:.3f}",
                     f"{s['fields']:.3f}", f"{s['export']:.3f}", f"{flops / 1e9:.1f}",
                     f"{flops / s['network'] / 1e9:.1f}", f"{heat_ms:.1f}"])
    peak = matmul_gflops(device)
    print(f"device: {device_name(device)}; model width {model.width}; fp32 matmul {peak:.1f} GFLOP/s")
    print(markdown_table(["working grid", "load+resample s", "network s", "head+fields s", "export s",
                          "network GFLOP", "network GFLOP/s", "heatmap query ms"], rows))
    if args.big:
        fixed = ct_on_grid(ct, (512, 512, 600), (0.75, 0.75, 0.6))
        moving, _ = deformed_copy(fixed, None, random_deformation(fixed, seed=2))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        result = match_pair(fixed, moving, model, device=str(device))
        with tempfile.TemporaryDirectory() as tmp:
            result.save(tmp, report=False)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        m = result.metrics
        print(f"512x512x600 CT: working grid {m['working_grid']} field grid {m['field_grid']['size']}, "
              f"seconds {({k: round(v, 2) for k, v in m['seconds'].items()})}, peak RSS {peak_rss:.1f} GiB "
              f"(before {before:.1f} GiB)")


if __name__ == "__main__":
    main()
