"""The paper's transfer protocol (Table 1) at small scale, on data we ship.

Labelled data: slicerio's CTChest4 with its 7 segments and randomly deformed copies
(affine + elastic). The last ``--test`` cases are held out. Four runs with the same
budget and seed: {scratch, GVSL} x {linear probe (frozen backbone), full fine-tune}.
Dice per class on the held-out cases after the last iteration.

    python benchmarks/transfer.py --iters 150 [--checkpoint CKPT]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table  # noqa: E402

from gvsl.finetune import FinetuneConfig, run_finetune  # noqa: E402
from gvsl.match import default_checkpoint  # noqa: E402
from gvsl.samples import chest_ct, write_sample_dataset  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=str(default_checkpoint()))
    p.add_argument("--out", default="transfer-run")
    p.add_argument("--copies", type=int, default=7)
    p.add_argument("--test", type=int, default=2)
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    if not (data / "images").exists():
        write_sample_dataset(data, deformed_copies=args.copies, seed=42, which="ct")
    images = sorted((data / "images").glob("*.nii.gz"))
    labels = [data / "labels" / i.name for i in images]
    split = {"train": (images[:-args.test], labels[:-args.test]), "test": (images[-args.test:], labels[-args.test:])}
    lists = {}
    for name, (imgs, labs) in split.items():
        (out / f"{name}_images.txt").write_text("\n".join(map(str, imgs)) + "\n", encoding="utf-8")
        (out / f"{name}_labels.txt").write_text("\n".join(map(str, labs)) + "\n", encoding="utf-8")
        lists[name] = (str(out / f"{name}_images.txt"), str(out / f"{name}_labels.txt"))
    classes = chest_ct()[2]
    from gvsl.checkpoint import load_model
    width = load_model(args.checkpoint).width

    results = {}
    for init_name, init in (("Scratch", "scratch"), ("GVSL", args.checkpoint)):
        for mode in ("linear", "full"):
            run_dir = out / f"{init_name.lower()}_{mode}"
            t0 = time.perf_counter()
            summary = run_finetune(FinetuneConfig(
                images=lists["train"][0], labels=lists["train"][1], val_images=lists["test"][0],
                val_labels=lists["test"][1], out=str(run_dir), init=init, mode=mode, classes=classes,
                patch=[args.patch] * 3, iters=args.iters, val_every=args.iters, batch=2, lr=args.lr,
                width=width if init == "scratch" else None, device=args.device, seed=args.seed,
                spacing=args.spacing, preset="ct", log_every=max(1, args.iters // 10), ckpt_every=10 ** 9,
                resume=(run_dir / "checkpoints" / "last.pt").exists()), progress="text")
            results[(init_name, mode)] = (summary["last_val_dice"], time.perf_counter() - t0)

    header = ["method", "protocol"] + classes + ["mean", "minutes"]
    rows = []
    for (init_name, mode), (dice, seconds) in results.items():
        values = [dice[c] for c in classes]
        rows.append([init_name, "linear probe" if mode == "linear" else "fine-tune"] +
                    [f"{100 * v:.1f}" for v in values] + [f"{100 * np.nanmean(values):.1f}", f"{seconds / 60:.1f}"])
    print(f"\nDice (%) on {args.test} held-out cases; {len(split['train'][0])} training cases; {args.iters} iterations, "
          f"patch {args.patch}³ at {args.spacing} mm, width {width}, seed {args.seed}")
    print(markdown_table(header, rows))
    (out / "transfer.json").write_text(json.dumps({f"{k[0]} {k[1]}": v[0] for k, v in results.items()}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
