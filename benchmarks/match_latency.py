"""Match pair latency per stage (load/resample, network, head and fields, export) at
64³, 96³ and 128³ working grids, for plain fp32 (the path before ``--precision``) and the
device's ``auto`` choice side by side in one run, with the network stage's speed-up and
achieved GFLOP/s. ``--big`` also matches a 512 x 512 x 600 CT and reports the capped
working grid and the peak memory.

    python benchmarks/match_latency.py --device cpu [--width 0.25] [--big] [--refine-iters N]

"network s" is the network stage as ``match_pair`` runs it (the model's forward on the
working grids, no gradients), timed here directly for each precision; the other stages
come from a full ``match_pair`` run, which uses the precision too when this build's
``match_pair`` takes a ``precision`` argument.
"""
import argparse
import dataclasses
import inspect
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import count_flops, device_name, markdown_table, matmul_gflops, sync  # noqa: E402

import gvsl  # noqa: E402
from gvsl.match import default_checkpoint, match_pair  # noqa: E402
from gvsl.runtime import pick_device, resolve_precision  # noqa: E402
from gvsl.samples import chest_ct, deformed_copy, random_deformation  # noqa: E402

MATCH_TAKES = set(inspect.signature(match_pair).parameters)


def ct_on_grid(ct, size_xyz, spacing):
    """The sample CT resampled onto an isotropic grid of ``size_xyz`` voxels."""
    centre = np.asarray(ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()]))
    origin = centre - (np.asarray(size_xyz) - 1) / 2 * np.asarray(spacing)
    return sitk.Resample(ct, [int(s) for s in size_xyz], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         spacing, np.eye(3).ravel().tolist(), -1024.0, sitk.sitkFloat32)


def precision_for(config, device):
    if config == "fp32-plain":
        return dataclasses.replace(resolve_precision(device, "fp32"), channels_last=False)
    return resolve_precision(device, config)


def network_seconds(model, precision, shape, device, repeats=2):
    """The network stage alone: ``model(a, b, restore=False)`` without gradients."""
    precision.prepare(model)
    a = torch.rand(1, 1, *shape, device=device)
    b = torch.rand(1, 1, *shape, device=device)
    with precision.inference():
        model(a, b, restore=False)  # warm-up (oneDNN primitive creation, cuDNN autotuning)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(a, b, restore=False)
        sync(device)
    return (time.perf_counter() - t0) / repeats


def match_kwargs(precision_name, refine_iters):
    kwargs = {}
    if "precision" in MATCH_TAKES:
        kwargs["precision"] = precision_name
    if refine_iters is not None and "refine_iters" in MATCH_TAKES:
        kwargs["refine_iters"] = refine_iters
    return kwargs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=float, default=None, help="random-init model of this width (default: shipped model)")
    p.add_argument("--sizes", default="64,96,128")
    p.add_argument("--configs", default="fp32-plain,auto", help="comma-separated: fp32-plain, fp32, bf16, fp16, auto")
    p.add_argument("--refine-iters", type=int, default=None,
                   help="passed to match_pair when it takes refine_iters (0 = network only)")
    p.add_argument("--big", action="store_true")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model = gvsl.GVSL(width=args.width) if args.width else gvsl.load_model(default_checkpoint())
    model = model.to(device).eval()
    configs = [c.strip() for c in args.configs.split(",")]
    ct, _, _ = chest_ct()
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        spacing = 384.0 / n  # the CT's field of view at n voxels
        fixed = ct_on_grid(ct, (n, n, n), (spacing,) * 3)
        moving, _ = deformed_copy(fixed, None, random_deformation(fixed, seed=1))
        baseline = None
        for config in configs:
            precision = precision_for(config, device)
            precision.prepare(model)
            kwargs = match_kwargs(precision.name, args.refine_iters)
            match_pair(fixed, moving, model, device=str(device), spacing_mm=spacing, max_size=n, **kwargs)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            result = match_pair(fixed, moving, model, device=str(device), spacing_mm=spacing, max_size=n, **kwargs)
            total = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                result.save(tmp, report=False)
            s = result.metrics["seconds"]
            shape = result.metrics["working_grid"]["shape_dhw"]
            net_s = network_seconds(model, precision, shape, device)
            baseline = baseline or (net_s if config == "fp32-plain" else None)
            centre = result.fixed_grid.physical_bounds_center()
            result.heatmap(centre, on_image_grid=False)
            t0 = time.perf_counter()
            for k in range(10):
                result.heatmap(centre + k, on_image_grid=False)
            heat_ms = (time.perf_counter() - t0) / 10 * 1000
            x = torch.rand(1, 1, *shape, device=device)
            with torch.no_grad():
                flops = count_flops(lambda: model(x, x, restore=False))
            refine = s.get("refine", s.get("refinement"))
            peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}" if device.type == "cuda" else "-"
            rows.append([f"{'x'.join(map(str, shape))}", config if config != precision.name else precision.name,
                         precision.name, "channels-last" if precision.channels_last else "contiguous",
                         f"{s['load_resample']:.3f}", f"{net_s:.3f}",
                         f"{baseline / net_s:.2f}×" if baseline else "-",
                         f"{refine:.3f}" if refine is not None else "-", f"{s['fields']:.3f}", f"{s['export']:.3f}",
                         f"{total:.2f}", f"{flops / 1e9:.1f}", f"{flops / net_s / 1e9:.1f}", f"{heat_ms:.1f}", peak])
    precision_for("fp32-plain", device).prepare(model)
    fp32_peak = matmul_gflops(device)
    low_peak = matmul_gflops(device, dtype=torch.bfloat16) if device.type != "mps" else float("nan")
    applied = ", ".join(sorted(k for k in ("precision", "refine_iters") if k in MATCH_TAKES)) or "neither"
    print(f"device: {device_name(device)}; torch {torch.__version__}; model width {model.width}; matmul GFLOP/s "
          f"fp32 {fp32_peak:.1f}, bf16 {low_peak:.1f}; match_pair takes precision/refine_iters: {applied}")
    print(markdown_table(["working grid", "config", "precision", "memory format", "load+resample s", "network s",
                          "network speed-up over fp32", "refine s", "head+fields s", "export s", "match total s",
                          "network GFLOP", "network GFLOP/s", "heatmap query ms", "peak GPU GiB"], rows))
    if args.big:
        precision = precision_for(configs[-1], device)
        precision.prepare(model)
        fixed = ct_on_grid(ct, (512, 512, 600), (0.75, 0.75, 0.6))
        moving, _ = deformed_copy(fixed, None, random_deformation(fixed, seed=2))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        t0 = time.perf_counter()
        result = match_pair(fixed, moving, model, device=str(device), **match_kwargs(precision.name, args.refine_iters))
        with tempfile.TemporaryDirectory() as tmp:
            result.save(tmp, report=False)
        total = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        m = result.metrics
        used = precision.label if "precision" in MATCH_TAKES else (
            f"{'channels-last' if precision.channels_last else 'contiguous'} model, fp32: match_pair takes no precision")
        print(f"512x512x600 CT ({configs[-1]}: {used}): working grid {m['working_grid']} field grid "
              f"{m['field_grid']['size']}, seconds {({k: round(v, 2) for k, v in m['seconds'].items()})}, "
              f"match + save {total:.1f} s, peak RSS {peak_rss:.1f} GiB (before {before:.1f} GiB)")


if __name__ == "__main__":
    main()
