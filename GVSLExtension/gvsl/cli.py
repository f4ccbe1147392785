"""``gvsl pretrain | match | demo | finetune | segment | export`` (also ``python -m gvsl``)."""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional


def _patch(text: str) -> List[int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"--patch wants one or three sizes >= 16, got {text!r}")
    return parts


def _whole_number(minimum: int):
    """An argparse type: a whole number >= ``minimum`` (0 allows "none", e.g. --refine-iters 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"wants a whole number >= {minimum}, got {text!r}")
        return value
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"wants a finite number, got {text!r}")
    return value


def _finite_where(accept, wanted: str):
    """An argparse type: a finite number for which ``accept(value)`` holds, else "wants WANTED"."""
    def parse(text: str) -> float:
        value = _finite(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"wants {wanted}, got {text!r}")
        return value
    return parse


_positive_int = _whole_number(1)
_count = _whole_number(0)
_positive = _finite_where(lambda v: v > 0, "a number > 0")
_non_negative = _finite_where(lambda v: v >= 0, "a number >= 0")
# [0, 1): a validation fraction of 1 would leave nothing to train on; an overlap of 1 never moves.
_fraction_below_one = _finite_where(lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_overlap = _fraction_below_one


def _known_setting(text: str):
    """An argparse type: KEY=NUMBER for one field of :class:`gvsl.synth.KnownPairConfig`."""
    from dataclasses import fields
    from .synth import KnownPairConfig
    names = {f.name: f for f in fields(KnownPairConfig) if f.type in ("float", float)}
    key, sep, value = text.partition("=")
    if not sep or key not in names:
        raise argparse.ArgumentTypeError(
            f"wants KEY=NUMBER with KEY one of {', '.join(sorted(names))}, got {text!r}")
    return key, _non_negative(value)
_fraction = _finite_where(lambda v: 0 <= v <= 1, "a fraction in [0, 1]")


def _precision(p: argparse.ArgumentParser):
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CPUs with native bf16 and on bf16 GPUs, fp16 on other GPUs, else fp32")


def _common_run(p: argparse.ArgumentParser, iters: int, batch: int, lr: float, patch: str):
    p.add_argument("--out", required=True, help="run folder (config.json, metrics.jsonl, checkpoints/)")
    p.add_argument("--patch", type=_patch, default=_patch(patch), help="crop size D,H,W or one size")
    p.add_argument("--iters", type=_positive_int, default=iters)
    p.add_argument("--batch", type=_positive_int, default=batch)
    p.add_argument("--lr", type=_positive, default=lr)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--amp", action="store_true", help="kept for old scripts: mixed precision is --precision auto, the default")
    _precision(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=_positive_int, default=500)
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--preset", default="auto", choices=["ct", "mr", "auto"], help="intensity preset")
    p.add_argument("--spacing", type=_positive, default=1.0, help="resampling spacing in mm")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "text", "json"])


def _refine_options(p: argparse.ArgumentParser):
    from .refine import DETAIL_MAX_VOXELS, SIMILARITIES, RefineOptions
    p.add_argument("--refine-iters", type=_count, default=RefineOptions.iterations,
                   help="optimiser steps of the refinement on the pair, on its coarsest level (finer levels "
                        f"get fewer); 0 = the network's answer only (default {RefineOptions.iterations})")
    p.add_argument("--similarity", default="lncc", choices=list(SIMILARITIES),
                   help="refinement similarity: lncc (local NCC, same modality) or mind (MIND-SSC, CT<->MR)")
    p.add_argument("--refine-detail", default="full", choices=list(DETAIL_MAX_VOXELS),
                   help="finest refinement level: full = the fixed image's own voxel size up to "
                        f"{DETAIL_MAX_VOXELS['full'] / 1e6:.1f} M voxels (a 1 mm brain at 1 mm, about 30 s on 2 CPU "
                        f"cores); fast = up to {DETAIL_MAX_VOXELS['fast'] / 1e6:.1f} M voxels (that brain at about "
                        "2 mm, about 4 s). Smaller scans are refined at their own voxel size either way")
    p.add_argument("--time-budget", type=_positive, default=None, metavar="SECONDS",
                   help="stop the refinement after this many seconds and keep what it reached")
    p.add_argument("--refine-tolerance", type=_non_negative, default=None, metavar="LOSS",
                   help="end a refinement stage once its loss improved by less than this over "
                        f"{RefineOptions.patience} steps; 0 = every step (default {RefineOptions.tolerance})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvsl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="self-supervised GVSL pre-training")
    p.add_argument("--data", required=True, help="folder (recursive) or text file listing volumes")
    _common_run(p, iters=10000, batch=1, lr=1e-4, patch="128")
    p.add_argument("--width", type=_positive, default=1.0, help="channel width factor (1.0 = official)")
    p.add_argument("--cache-dir", default=None, help="preprocessed-volume cache (default RUN/cache)")
    p.add_argument("--init", default=None, help="start from these weights (ours or official)")
    p.add_argument("--no-augment", action="store_true", help="train on raw crops (debugging)")
    p.add_argument("--known-pairs", type=_fraction, default=0.0, metavar="FRACTION",
                   help="fraction of steps on known-transform pairs generated on the fly (real crops under a "
                        "random affine + elastic transform, synthetic label maps, random contrasts), supervised "
                        "by the known field; 0 = GVSL's two-volume pairs only (default)")
    p.add_argument("--matching", default="official", choices=["official", "correlation"],
                   help="Z-matching head: official (affine regressed from the bottleneck) or correlation "
                        "(soft-argmax of stride-4 feature similarity, affine fitted to it; see gvsl.network)")
    p.add_argument("--match-window", type=int, default=None, choices=[1, 2, 3], metavar="CELLS",
                   help="correlation head: a local soft-argmax, refined by mean shift with a Gaussian of this many "
                        "cells (default: the expectation over the whole +-3-cell search, as before)")
    p.add_argument("--field-weight", type=_non_negative, default=1.0,
                   help="weight of the known-field loss on those pairs (default 1)")
    p.add_argument("--contrast-weight", type=_non_negative, default=0.0,
                   help="weight of the dense descriptor InfoNCE on those pairs (SAM-style: a voxel's heatmap "
                        "descriptor must match its known correspondent over near and far negatives; default 0)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant --lr, or cosine from --lr down to --lr-final over --iters")
    p.add_argument("--lr-final", type=_non_negative, default=1e-5, help="last learning rate of the cosine schedule")
    p.add_argument("--known", type=_known_setting, action="append", default=[], metavar="KEY=NUMBER",
                   help="change one range of the known-transform pairs (gvsl.synth.KnownPairConfig), e.g. "
                        "coarse_elastic_voxels=3 for subject-like smooth shape differences; repeatable")
    p.add_argument("--pairs-within", default="any", choices=["any", "folder"],
                   help="two-volume pairs from any two volumes, or only from two volumes in one folder "
                        "(one body region per folder)")

    p = sub.add_parser("match", help="match a pair of volumes in physical space")
    p.add_argument("fixed", help="volume file, DICOM folder, or FOLDER::SERIES_UID for one series of a folder")
    p.add_argument("moving", help="as fixed")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="weights (default: the shipped demo model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="auto", choices=["ct", "mr", "auto"])
    p.add_argument("--spacing", type=_positive, default=None,
                   help="working-grid spacing in mm (default: the model's training spacing, else 1)")
    p.add_argument("--max-size", type=_positive_int, default=None,
                   help="cap on the working grid's longest side (default: the model's patch size, else 128)")
    p.add_argument("--points", default=None, help="CSV or JSON of LPS points (x,y,z[,image])")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--save-state", action="store_true", help="also write state.npz (features) for heatmap queries")
    _refine_options(p)
    _precision(p)
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "text", "json"])

    p = sub.add_parser("demo", help="match the bundled sample CT against a deformed copy")
    p.add_argument("--out", default="gvsl-demo")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--sample", default="ct", choices=["ct", "mri"])
    p.add_argument("--seed", type=int, default=7)
    _refine_options(p)

    p = sub.add_parser("finetune", help="fine-tune or linearly probe for segmentation")
    p.add_argument("--images", required=True, help="folder or list file of images")
    p.add_argument("--labels", required=True, help="folder or list file of label maps (same order/names)")
    _common_run(p, iters=2000, batch=1, lr=1e-4, patch="128")
    p.add_argument("--init", default="scratch", help="checkpoint (ours or official) or 'scratch'")
    p.add_argument("--mode", default="full", choices=["full", "linear"])
    p.add_argument("--classes", default=None, help="comma-separated class names for labels 1..K")
    p.add_argument("--val-fraction", type=_fraction_below_one, default=0.2)
    p.add_argument("--val-images", default=None)
    p.add_argument("--val-labels", default=None)
    p.add_argument("--val-every", type=_positive_int, default=100)
    p.add_argument("--width", type=_positive, default=None, help="width for --init scratch (default 1.0)")
    p.add_argument("--cache-dir", default=None)

    p = sub.add_parser("web", help="serve the browser front end (GVSLWeb; needs the web extra and a checkout)",
                       add_help=False)
    p.add_argument("web_args", nargs=argparse.REMAINDER, help="GVSLWeb's options (--data-root, --host, --token, ...)")

    p = sub.add_parser("export", help="copy a checkpoint without its optimizer state (to share or ship); "
                                      "several checkpoints of one run: their weights averaged")
    p.add_argument("sources", nargs="+", metavar="source",
                   help="one checkpoint, or several of one architecture whose weights are averaged "
                        "(e.g. runs/r/checkpoints/step_00018*.pt step_00019*.pt)")
    p.add_argument("target")
    p.add_argument("--match-window", default="keep", choices=["keep", "none", "1", "2", "3"],
                   help="set the correlation head's local soft-argmax window (cells, see pretrain) of one exported checkpoint; "
                        "none = the whole search (default: keep the checkpoint's)")

    p = sub.add_parser("segment", help="segment a volume with a fine-tuned checkpoint")
    p.add_argument("image", help="the volume to segment (any format SimpleITK reads: .nii.gz, .nrrd, ...), "
                                 "a DICOM folder, or FOLDER::SERIES_UID for one series of a folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output label map (.nii.gz, .nrrd, ...)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--overlap", type=_overlap, default=0.5,
                   help="fraction by which neighbouring sliding windows overlap (0 to <1; smaller is faster)")
    p.add_argument("--window-batch", type=_positive_int, default=None,
                   help="sliding windows per forward pass (default: about 128^3 voxels on a CPU, 8 x on a GPU)")
    _precision(p)
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "text", "json"])
    return parser


def _one_line_input_warnings(command: str):
    """Doubts about the input (``gvsl.data.InputWarning``) as one plain line each."""
    import warnings
    from .data import InputWarning
    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if issubclass(category, InputWarning):
            return f"gvsl {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)
    warnings.formatwarning = one_line


def web_front_end_folder():
    """GVSLModule/ of this checkout (the web front end sits beside the engine, over the Slicer
    module's logic; a wheel of the engine alone does not have it)."""
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / "GVSLModule"
    return folder if (folder / "GVSLWeb" / "app.py").is_file() else None


def run_web(web_args: List[str]) -> int:
    """``python -m GVSLWeb ARGS`` with the module folder on the path: the engine imports nothing of it."""
    import os
    import subprocess
    folder = web_front_end_folder()
    if folder is None:
        raise RuntimeError("the browser front end is not part of this installation: it lives in the repository's "
                           "GVSLModule/GVSLWeb; install from a checkout (pip install -e \".[web]\")")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return subprocess.call([sys.executable, "-m", "GVSLWeb", *web_args], env=env)


def main(argv: Optional[List[str]] = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # An ASCII locale must not turn a class name like "Lunge rechts" with an umlaut into a crash.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["web"]:  # every later option is GVSLWeb's own (argparse would claim --help, --host ...)
        try:
            return run_web(argv[1:])
        except RuntimeError as exc:
            print(f"gvsl: {exc}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    _one_line_input_warnings(args.command)
    try:
        if args.command == "pretrain":
            from .pretrain import PretrainConfig, run_pretrain
            cfg = PretrainConfig(data=args.data, out=args.out, patch=args.patch, iters=args.iters,
                                 batch=args.batch, lr=args.lr, width=args.width, device=args.device,
                                 amp=args.amp, precision=args.precision, seed=args.seed, ckpt_every=args.ckpt_every,
                                 log_every=args.log_every, preset=args.preset, spacing=args.spacing,
                                 cache_dir=args.cache_dir, resume=args.resume, init=args.init,
                                 augment=not args.no_augment, known_pairs=args.known_pairs,
                                 matching=args.matching, match_window=args.match_window,
                                 lr_schedule=args.lr_schedule, lr_final=args.lr_final,
                                 pairs_within=args.pairs_within)
            cfg.weights["field"] = args.field_weight
            cfg.weights["contrast"] = args.contrast_weight
            cfg.known.update(dict(args.known))
            run_pretrain(cfg, progress=args.progress)
        elif args.command == "match":
            from .match import match_cli
            match_cli(args)
        elif args.command == "demo":
            from .demo import run_demo
            run_demo(out=args.out, checkpoint=args.checkpoint, device=args.device, sample=args.sample,
                     seed=args.seed, refine_iters=args.refine_iters, similarity=args.similarity,
                     time_budget_s=args.time_budget, refine_tolerance=args.refine_tolerance,
                     refine_detail=args.refine_detail)
        elif args.command == "finetune":
            from .finetune import finetune_cli
            finetune_cli(args)
        elif args.command == "export":
            from .checkpoint import average_weights, export_weights
            window = args.match_window if args.match_window == "keep" else (
                None if args.match_window == "none" else int(args.match_window))
            if len(args.sources) == 1:
                print(export_weights(args.sources[0], args.target, window))
            elif window != "keep":
                raise ValueError("--match-window applies to one exported checkpoint; average first, then export it")
            else:
                print(average_weights(args.sources, args.target))
        elif args.command == "segment":
            from .segment import segment_cli
            segment_cli(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the user; GVSL_DEBUG=1 shows the traceback
        import os
        if os.environ.get("GVSL_DEBUG"):
            raise
        print(f"gvsl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
