"""Pre-training throughput: one training step (augmentation + forward + backward + Adam)
per precision and memory format, side by side in one run, with the speed-up over plain
fp32 (the path before ``--precision`` existed) and, with ``--official``, over the official
code's training step on the same device, patch and batch 1 (it rejects larger batches).

    python benchmarks/pretrain_throughput.py --width 1 --patch 64 --batch 1 --device cpu
    python benchmarks/pretrain_throughput.py --width 1 --patch 128 --batch 2 --device cuda \\
        --official /path/to/GVSL/PyTorch

``--official`` takes the ``PyTorch`` folder of a checkout of YutingHe-list/GVSL (not shipped
here); its model, augmentation and losses are imported from there and run as its
``Train_GVSL.py`` runs them. On a CPU its hard-wired ``.cuda()`` calls are made no-ops for
the duration of the measurement only.

``--configs`` lists what to measure: ``fp32-plain`` (fp32, NCDHW), ``fp32`` (fp32,
channels-last where ``auto`` would use it), ``bf16``, ``fp16``, ``auto`` (what
``gvsl pretrain`` uses by default on this device).
"""
import argparse
import dataclasses
import importlib
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import count_flops, device_name, markdown_table, matmul_gflops, sync  # noqa: E402

import gvsl  # noqa: E402
from gvsl.augment import augment_pair  # noqa: E402
from gvsl.losses import GVSLLoss  # noqa: E402
from gvsl.runtime import pick_device, resolve_precision  # noqa: E402


def precision_for(config: str, device):
    if config == "fp32-plain":
        return dataclasses.replace(resolve_precision(device, "fp32"), channels_last=False)
    return resolve_precision(device, config)


def timed(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return seconds, peak


def our_step(width, precision, a, b):
    torch.manual_seed(0)
    model = precision.prepare(gvsl.GVSL(width=width).to(a.device).train())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = precision.grad_scaler()
    criterion = GVSLLoss()

    def step(augment=True):
        with torch.no_grad():
            x, target, y = augment_pair(a, b) if augment else (a, a, b)
        with precision.autocast():
            out = model(x, y)
        loss, _ = criterion(out, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return model, step


@contextmanager
def cuda_calls_stay_on(device):
    """The official code calls ``.cuda()`` and ``.to("cuda")`` unconditionally; on a CPU,
    make both return the tensor where it is, and restore them afterwards."""
    if device.type == "cuda":
        yield
        return
    original_cuda, original_to = torch.Tensor.cuda, torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return self
        return original_to(self, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = original_cuda, original_to


def official_step(official_dir, a, b):
    """One iteration of the official ``Trainer.train_epoch`` + ``train_iterator``."""
    sys.path.insert(0, str(Path(official_dir).resolve()))
    models = importlib.import_module("models.gvsl")
    transforms = importlib.import_module("utils.Transform_self")
    losses = importlib.import_module("utils.losses")
    torch.manual_seed(0)
    np.random.seed(0)
    model = models.GVSL().to(a.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    # The official Train_GVSL.py settings.
    spatial = transforms.SpatialTransform(
        do_rotation=True, angle_x=(-np.pi / 9, np.pi / 9), angle_y=(-np.pi / 9, np.pi / 9),
        angle_z=(-np.pi / 9, np.pi / 9), do_scale=True, scale_x=(0.75, 1.25), scale_y=(0.75, 1.25),
        scale_z=(0.75, 1.25), do_translate=True, trans_x=(-0.1, 0.1), trans_y=(-0.1, 0.1), trans_z=(-0.1, 0.1),
        do_shear=True, shear_xy=(-np.pi / 18, np.pi / 18), shear_xz=(-np.pi / 18, np.pi / 18),
        shear_yx=(-np.pi / 18, np.pi / 18), shear_yz=(-np.pi / 18, np.pi / 18),
        shear_zx=(-np.pi / 18, np.pi / 18), shear_zy=(-np.pi / 18, np.pi / 18),
        do_elastic_deform=True, alpha=(0., 512.), sigma=(10., 13.))
    style = transforms.AppearanceTransform(local_rate=0.8, nonlinear_rate=0.9, paint_rate=0.9, inpaint_rate=0.2)
    img1_cpu, img2 = a[:1].cpu(), b[:1]

    def step():
        img1_aug = style.rand_aug(img1_cpu.numpy()[0].copy())
        img1_aug = torch.from_numpy(img1_aug[np.newaxis]).to(a.device)
        img1 = a[:1]
        mat, code = spatial.rand_coords(img1.shape[2:])
        img1_aug = spatial.augment_spatial(img1_aug, mat, code)
        img1_s = spatial.augment_spatial(img1, mat, code)
        img2_s = spatial.augment_spatial(img2, mat, code)
        res_a, warp_ba, _, flow_ba = model(img1_aug, img2_s)
        loss = losses.ncc_loss(warp_ba, img1_s) + losses.MSE(res_a, img1_s) + losses.gradient_loss(flow_ba)
        loss.backward()
        optimizer.step()
        model.zero_grad()
        optimizer.zero_grad()

    return model, step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--configs", default="fp32-plain,auto", help="comma-separated: fp32-plain, fp32, bf16, fp16, auto")
    p.add_argument("--official", default=None, help="the PyTorch/ folder of a checkout of the official GVSL code")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting (one extra step per config)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    shape = (args.batch, 1, args.patch, args.patch, args.patch)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=generator).to(device)
    b = torch.rand(shape, generator=generator).to(device)

    official = None
    if args.official:
        with cuda_calls_stay_on(device):
            model, step = official_step(args.official, a, b)
            seconds, peak = timed(step, args.steps, args.warmup, device)
        official = (seconds, peak)
        del model, step

    results = []
    for config in args.configs.split(","):
        precision = precision_for(config.strip(), device)
        model, step = our_step(args.width, precision, a, b)
        flops = None if args.no_flops else count_flops(lambda: step(augment=False))
        seconds, peak = timed(step, args.steps, args.warmup, device)
        params = sum(q.numel() for q in model.parameters())
        results.append((config.strip(), precision, seconds, peak, flops, params))
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    baseline = next((r[2] for r in results if r[0] == "fp32-plain"), None)
    fp32_peak = matmul_gflops(device)
    low_peak = matmul_gflops(device, dtype=torch.bfloat16) if device.type != "mps" else float("nan")
    print(f"device: {device_name(device)}; torch {torch.__version__}; matmul GFLOP/s fp32 {fp32_peak:.1f}, "
          f"bf16 {low_peak:.1f}; steps timed {args.steps} after {args.warmup} warm-up")
    rows = []
    if official:
        seconds, peak = official
        rows.append([device_name(device), 1.0, f"{args.patch}³", 1, "official code (fp32)", "contiguous", "-",
                     f"{seconds:.3f}", f"{1 / seconds:.2f}", f"{baseline / seconds:.2f}×" if baseline else "-", "1.00×",
                     "-", "-", f"{peak:.2f}" if peak is not None else "-"])
    for config, precision, seconds, peak, flops, params in results:
        samples = args.batch / seconds
        rows.append([device_name(device), args.width, f"{args.patch}³", args.batch,
                     f"{config} ({precision.name})" if config in ("auto", "fp32-plain") else precision.name,
                     "channels-last" if precision.channels_last else "contiguous", f"{params / 1e6:.2f} M",
                     f"{seconds:.3f}", f"{samples:.2f}", f"{baseline / seconds:.2f}×" if baseline else "-",
                     f"{samples * official[0]:.2f}×" if official else "-",
                     f"{flops / 1e9:.1f}" if flops else "-", f"{flops / seconds / 1e9:.1f}" if flops else "-",
                     f"{peak:.2f}" if peak is not None else "-"])
    print(markdown_table(["device", "width", "patch", "batch", "precision", "memory format", "params", "s/step",
                          "samples/s", "speed-up over fp32", "× official samples/s", "GFLOP/step",
                          "achieved GFLOP/s", "peak GPU GiB"], rows))


if __name__ == "__main__":
    main()
