"""Pre-training throughput: samples/s and the network's achieved GFLOP/s beside this
device's measured float32 matmul GFLOP/s.

    python benchmarks/pretrain_throughput.py --width 0.25 --patch 64 --batch 1 --device cpu
    python benchmarks/pretrain_throughput.py --width 1 --patch 128 --batch 2 --device cuda [--amp]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import count_flops, device_name, markdown_table, matmul_gflops, sync  # noqa: E402

import gvsl  # noqa: E402
from gvsl.augment import augment_pair  # noqa: E402
from gvsl.losses import GVSLLoss  # noqa: E402
from gvsl.runtime import autocast_context, pick_device  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = gvsl.GVSL(width=args.width).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    criterion = GVSLLoss()
    shape = (args.batch, 1, args.patch, args.patch, args.patch)
    a = torch.rand(shape, device=device)
    b = torch.rand(shape, device=device)

    def step(augment=True):
        with torch.no_grad():
            x, target, y = augment_pair(a, b) if augment else (a, a, b)
        with autocast_context(device, args.amp):
            out = model(x, y)
        loss, _ = criterion(out, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    flops = count_flops(lambda: step(augment=False))
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    peak = matmul_gflops(device)
    rows = [[device_name(device), args.width, f"{args.patch}³", args.batch, "amp" if args.amp else "fp32",
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", f"{seconds:.3f}",
             f"{args.batch / seconds:.2f}", f"{flops / 1e9:.1f}", f"{flops / seconds / 1e9:.1f}", f"{peak:.1f}"]]
    print(markdown_table(["device", "width", "patch", "batch", "precision", "params", "s/step", "samples/s",
                          "GFLOP/step", "achieved GFLOP/s", "fp32 matmul GFLOP/s"], rows))
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
