"""The paper's transfer protocol (Table 1) at small scale, on data we ship.

``--task chest``: slicerio's CTChest4 with its 7 segments and randomly deformed copies
(affine + elastic); the last ``--test`` cases are held out (the same patient).

``--task brain``: grey / white matter of **another subject**: training on nilearn's MNI152
T1 (its tissue maps, ``pip install nilearn``) and deformed copies, testing on Colin27
(``apt-get install mricron-data``; brain-extracted with MRIcron's own ``ch2bet`` mask, tissue
by a 3-class Otsu inside it, see ``datasets.cross_subject_pairs``) and deformed copies of it.

Runs with the same budget for each seed of ``--seeds``: {scratch, GVSL} x ``--protocols``
(linear probe = frozen backbone, full fine-tune). Dice per class on the held-out cases after
the last iteration; with several seeds, the mean and standard deviation over seeds.

    python benchmarks/transfer.py --iters 150 [--checkpoint CKPT]
    python benchmarks/transfer.py --task brain --seeds 0 1 2 --protocols full --iters 150
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
    p.add_argument("--task", choices=("chest", "brain"), default="chest")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--protocols", nargs="+", choices=("linear", "full"), default=["linear", "full"])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    if args.task == "chest":
        if not (data / "images").exists():
            write_sample_dataset(data, deformed_copies=args.copies, seed=42, which="ct")
        images = sorted((data / "images").glob("*.nii.gz"))
        labels = [data / "labels" / i.name for i in images]
        split = {"train": (images[:-args.test], labels[:-args.test]), "test": (images[-args.test:], labels[-args.test:])}
        classes, preset = chest_ct()[2], "ct"
    else:
        split = write_brain_dataset(data, args.copies, args.test)
        classes, preset = ["grey matter", "white matter"], "mr"
    lists = {}
    for name, (imgs, labs) in split.items():
        (out / f"{name}_images.txt").write_text("\n".join(map(str, imgs)) + "\n", encoding="utf-8")
        (out / f"{name}_labels.txt").write_text("\n".join(map(str, labs)) + "\n", encoding="utf-8")
        lists[name] = (str(out / f"{name}_images.txt"), str(out / f"{name}_labels.txt"))
    from gvsl.checkpoint import load_model
    width = load_model(args.checkpoint).width

    results = {}
    for seed in args.seeds:
        for init_name, init in (("Scratch", "scratch"), ("GVSL", args.checkpoint)):
            for mode in args.protocols:
                run_dir = out / f"{init_name.lower()}_{mode}" if args.seeds == [0] else \
                    out / f"{init_name.lower()}_{mode}_seed{seed}"
                t0 = time.perf_counter()
                summary = run_finetune(FinetuneConfig(
                    images=lists["train"][0], labels=lists["train"][1], val_images=lists["test"][0],
                    val_labels=lists["test"][1], out=str(run_dir), init=init, mode=mode, classes=classes,
                    patch=[args.patch] * 3, iters=args.iters, val_every=args.iters, batch=2, lr=args.lr,
                    width=width if init == "scratch" else None, device=args.device, seed=seed,
                    spacing=args.spacing, preset=preset, log_every=max(1, args.iters // 10), ckpt_every=10 ** 9,
                    resume=(run_dir / "checkpoints" / "last.pt").exists()), progress="text")
                results[(init_name, mode, seed)] = (summary["last_val_dice"], time.perf_counter() - t0)

    header = ["method", "protocol", "seed"] + classes + ["mean", "minutes"]
    rows = []
    for (init_name, mode, seed), (dice, seconds) in results.items():
        values = [dice[c] for c in classes]
        rows.append([init_name, "linear probe" if mode == "linear" else "fine-tune", seed] +
                    [f"{100 * v:.1f}" for v in values] + [f"{100 * np.nanmean(values):.1f}", f"{seconds / 60:.1f}"])
    print(f"\nDice (%) on {args.test} held-out cases ({args.task}); {len(split['train'][0])} training cases; "
          f"{args.iters} iterations, patch {args.patch}³ at {args.spacing} mm, width {width}, seeds {args.seeds}")
    print(markdown_table(header, rows))
    if len(args.seeds) > 1:
        spread = []
        for init_name in ("Scratch", "GVSL"):
            for mode in args.protocols:
                means = [100 * np.nanmean([results[(init_name, mode, s)][0][c] for c in classes]) for s in args.seeds]
                per_class = [[100 * results[(init_name, mode, s)][0][c] for s in args.seeds] for c in classes]
                spread.append([init_name, "linear probe" if mode == "linear" else "fine-tune"] +
                              [f"{np.mean(v):.1f} ± {np.std(v):.1f}" for v in per_class] +
                              [f"{np.mean(means):.1f} ± {np.std(means):.1f}"])
        print(f"\nMean ± standard deviation over {len(args.seeds)} seeds")
        print(markdown_table(["method", "protocol"] + classes + ["mean"], spread))
    (out / "transfer.json").write_text(json.dumps({f"{k[0]} {k[1]} seed {k[2]}": v[0] for k, v in results.items()},
                                                  indent=2), encoding="utf-8")


def write_brain_dataset(folder: Path, copies: int, test: int):
    """Training: MNI152 and ``copies`` deformed copies; test: Colin27 (brain-extracted) and
    ``test - 1`` deformed copies of it. Returns {"train"/"test": (images, labels)}."""
    import SimpleITK as sitk
    import datasets
    from gvsl.samples import deformed_copy, random_deformation
    split = {}
    pair = datasets.cross_subject_pairs(spacing_mm=2.0)
    if not pair:
        raise SystemExit("the brain task needs nilearn (pip install nilearn) and mricron-data (apt-get install mricron-data)")
    pair = pair[0]
    colin_brain = sitk.Mask(pair.moving, sitk.Cast(datasets.colin27_brain_mask(2.0) > 0, sitk.sitkUInt8))
    for name, image, labels, count, seed in (("train", pair.fixed, pair.fixed_labels, copies + 1, 42),
                                             ("test", colin_brain, pair.moving_labels, test, 43)):
        (folder / name / "images").mkdir(parents=True, exist_ok=True)
        (folder / name / "labels").mkdir(parents=True, exist_ok=True)
        images, labels_out = [], []
        for k in range(count):
            if k == 0:
                img, lab = image, labels
            else:
                img, lab = deformed_copy(image, labels, random_deformation(image, seed=seed * 100 + k), 0.0)
            path = folder / name / "images" / f"{name}_{k:02d}.nii.gz"
            if not path.exists():
                sitk.WriteImage(img, str(path))
                sitk.WriteImage(lab, str(folder / name / "labels" / path.name))
            images.append(path)
            labels_out.append(folder / name / "labels" / path.name)
        split[name] = (images, labels_out)
    return split


if __name__ == "__main__":
    main()
