"""``gvsl finetune``: segmentation from GVSL weights (full fine-tuning or linear probing).

The official downstream recipe: backbone + 3^3 convolution + softmax, Dice + cross-entropy
(MONAI's DiceCELoss), Adam 1e-4, random crops, validation Dice every N iterations with
the best checkpoint kept. ``--mode linear`` freezes the backbone (the paper's linear
evaluation). Class names and preprocessing travel inside the checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import FORMAT, FORMAT_VERSION, save_atomic
from .conventions import Grid
from .data import (InputError, cache_key, find_volumes, fitting_grid, normalized_image, read_image, resample_to,
                   write_cache_atomic)
from .metrics import dice_per_label
from .network import GVSL, SegmentationNet
from .runtime import (Distributed, EtaClock, MetricsLog, Precision, Reporter, StopFlag, check_finite_losses,
                      error_events, gather_sampler_states, prepare_run_dir, resolve_precision, resume_state,
                      run_folder_lock, write_checkpoint)
from .safe_io import finite_or_none, write_json_atomic


@dataclass
class FinetuneConfig:
    images: str
    labels: str
    out: str
    init: str = "scratch"
    mode: str = "full"
    classes: Optional[List[str]] = None
    val_fraction: float = 0.2
    val_images: Optional[str] = None
    val_labels: Optional[str] = None
    val_every: int = 100
    patch: List[int] = field(default_factory=lambda: [128, 128, 128])
    iters: int = 2000
    batch: int = 1
    lr: float = 1e-4
    width: Optional[float] = None
    device: str = "auto"
    amp: bool = False  # kept for old scripts; mixed precision is what precision="auto" picks
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see runtime.resolve_precision)
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 10
    preset: str = "auto"
    spacing: float = 1.0
    cache_dir: Optional[str] = None
    resume: bool = False
    foreground_crop_fraction: float = 0.5


# ------------------------------------------------------------------------ data


def _stem(path: str) -> str:
    name = Path(path.split("::")[0]).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def pair_images_and_labels(images, labels) -> List[Tuple[str, str]]:
    """Pair by file name (``case1.nii.gz`` with ``case1.nii.gz`` or ``case1_seg...``); by
    order only when no name pairs at all and both lists have the same length. When some
    names pair and others do not, the unmatched files are named: pairing the rest by order
    would silently give images the wrong label maps."""
    from .data import warn_input
    image_paths, label_paths = find_volumes(images), find_volumes(labels)
    if not image_paths:
        raise InputError(f"{images}: no images found")
    if not label_paths:
        raise InputError(f"{labels}: no label maps found")
    by_stem = {_stem(p): p for p in label_paths}
    pairs = []
    for image in image_paths:
        stem = _stem(image)
        match = by_stem.get(stem) or next((p for s, p in by_stem.items() if s.startswith(stem + "_")), None)
        pairs.append((image, match))
    matched = [label for _, label in pairs if label]
    if len(matched) == len(pairs):
        return pairs
    if not matched and len(image_paths) == len(label_paths):
        warn_input(f"{labels}: no label file name matches an image's, so images and labels are paired by "
                   f"order ({Path(image_paths[0].split('::')[0]).name} with {Path(label_paths[0]).name}, ...); "
                   f"name them alike (case1.nii.gz and case1.nii.gz or case1_seg.nii.gz) to be sure")
        return list(zip(image_paths, label_paths))
    missing = [Path(image.split("::")[0]).name for image, label in pairs if label is None]
    unused = [Path(p.split("::")[0]).name for p in label_paths if p not in matched]
    raise InputError(f"{labels}: no label map named like {len(missing)} image(s): {', '.join(missing[:5])}"
                     f"{' ...' if len(missing) > 5 else ''}"
                     f"{f'; label maps left unpaired: ' + ', '.join(unused[:5]) if unused else ''}"
                     f"{' ...' if len(unused) > 5 else ''}; rename them to match (case1.nii.gz with case1.nii.gz "
                     f"or case1_seg.nii.gz), or remove them")


def check_resumed_classes(ckpt: dict, classes: List[str], named: bool, path) -> List[str]:
    """The class names a resumed run goes on with: its own. Other names given with
    ``--classes`` (or another count) are refused, not silently written into the checkpoint."""
    saved = list(ckpt.get("classes") or [])
    if not saved or saved == list(classes):
        return list(classes)
    if named or len(saved) != len(classes):
        raise InputError(f"{path}: the run was started with classes {','.join(saved)}, this command gives "
                         f"{','.join(classes)}; resume with --classes \"{','.join(saved)}\" (or without --classes), "
                         f"or start a new run in another --out")
    return saved


def check_same_geometry(image: sitk.Image, label: sitk.Image, image_path: str, label_path: str):
    a, b = Grid.of(image), Grid.of(label)
    problems = []
    if a.size != b.size:
        problems.append(f"size {a.size} vs {b.size}")
    if not np.allclose(a.spacing, b.spacing, rtol=1e-4, atol=1e-6):
        problems.append(f"spacing {a.spacing} vs {b.spacing}")
    if not np.allclose(a.origin, b.origin, atol=1e-3):
        problems.append(f"origin {a.origin} vs {b.origin}")
    if not np.allclose(a.direction, b.direction, atol=1e-5):
        problems.append(f"direction {a.direction} vs {b.direction}")
    if problems:
        raise InputError(f"{image_path} and its label {label_path} differ in geometry: " + "; ".join(problems))


MAX_LABEL = 255  # label maps are cached and trained as uint8


def read_label(path: str) -> sitk.Image:
    """A label map as uint8: 0 = background, 1..K = classes. Negative values or values above
    255 are refused by name (a cast would silently turn -1 into class 255)."""
    image = read_image(path, check=False)  # an all-background label map is allowed
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.equal(np.mod(array, 1), 0)):
        raise InputError(f"{path}: label map holds non-integer values")
    low, high = array.min(), array.max()
    if low < 0 or high > MAX_LABEL:
        values = np.unique(array)
        bad = [int(v) for v in values if v < 0 or v > MAX_LABEL]
        raise InputError(f"{path}: label map holds values {bad[:5]} outside 0..{MAX_LABEL} "
                         f"({int(((array < 0) | (array > MAX_LABEL)).sum())} voxels); labels are 0 = background, "
                         f"1..K = classes")
    return sitk.Cast(image, sitk.sitkUInt8)


def infer_class_count(label_values_by_file: dict, source) -> int:
    """K for labels 1..K when ``--classes`` is not given, refusing label maps whose largest
    value is a stray (most of 1..max absent): it would create that many empty classes."""
    present = sorted(set().union(*label_values_by_file.values()) - {0}) if label_values_by_file else []
    if not present:
        raise InputError(f"{source}: the label maps hold background only")
    largest = present[-1]
    if len(present) < largest / 2:
        holders = [str(path) for path, values in label_values_by_file.items() if largest in values]
        raise InputError(f"{source}: labels {present[:8]}{'...' if len(present) > 8 else ''} are sparse: inferring "
                         f"the class count from the largest ({largest}, in {', '.join(holders[:2])}) would train "
                         f"{largest} classes, {largest - len(present)} of them absent; pass --classes with the "
                         f"names of labels 1..K, or fix the label maps")
    return largest


def preprocess_case(image_path: str, label_path: str, preset: str, spacing: float, num_classes: Optional[int],
                    cache_dir) -> Tuple[np.ndarray, np.ndarray, str]:
    """Normalised image (float16) and label (uint8) on the isotropic working grid, cached."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"seg_{cache_key([image_path, label_path], preset, spacing)}.npz"
    if target.exists():
        data = np.load(target)
        return data["image"], data["label"], str(data["preset"])
    image = read_image(image_path)
    label = read_label(label_path)
    check_same_geometry(image, label, image_path, label_path)
    values = np.unique(sitk.GetArrayViewFromImage(label))
    if num_classes is not None and (values.min() < 0 or values.max() > num_classes):
        bad = [int(v) for v in values if v < 0 or v > num_classes]
        raise InputError(f"{label_path}: labels {bad} are outside the declared classes 0..{num_classes}")
    normalized, used = normalized_image(image, preset)
    grid = fitting_grid([image], spacing, max_size=None, multiple=1)[0]
    image_w = sitk.GetArrayFromImage(resample_to(normalized, grid)).astype(np.float16)
    label_w = sitk.GetArrayFromImage(resample_to(label, grid, linear=False)).astype(np.uint8)
    write_cache_atomic(target, lambda handle: np.savez(handle, image=image_w, label=label_w, preset=used))
    return image_w, label_w, used


class CropSampler:
    """Random crops of (image, label); a fraction centred on a random foreground voxel."""

    def __init__(self, cases, patch, seed, foreground_fraction):
        self.cases = cases
        self.patch = tuple(patch)
        self.rng = np.random.default_rng(seed)
        self.foreground_fraction = foreground_fraction
        self.foreground = [np.argwhere(label > 0) for _, label in cases]

    def _crop(self, array, start, fill):
        out = np.full(self.patch, fill, dtype=array.dtype)
        src, dst = [], []
        for s, p, n in zip(start, self.patch, array.shape):
            a, b = max(s, 0), min(s + p, n)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        out[tuple(dst)] = array[tuple(src)]
        return out

    def sample(self, batch):
        images, labels = [], []
        for _ in range(batch):
            k = int(self.rng.integers(len(self.cases)))
            image, label = self.cases[k]
            fg = self.foreground[k]
            if len(fg) and self.rng.random() < self.foreground_fraction:
                centre = fg[self.rng.integers(len(fg))]
                start = [int(c) - p // 2 for c, p in zip(centre, self.patch)]
            else:
                start = [int(self.rng.integers(min(0, n - p), max(0, n - p) + 1)) for n, p in zip(image.shape, self.patch)]
            images.append(self._crop(image, start, 0).astype(np.float32))
            labels.append(self._crop(label, start, 0).astype(np.int64))
        return np.stack(images)[:, None], np.stack(labels)[:, None]

    def state(self):
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state


# ----------------------------------------------------------------------- model


def build_segmentation_model(cfg: FinetuneConfig, num_classes: int, log) -> SegmentationNet:
    if cfg.init == "scratch":
        return SegmentationNet(num_classes, width=cfg.width or 1.0)
    from .checkpoint import load_model
    base: GVSL = load_model(cfg.init)
    if cfg.width is not None and abs(cfg.width - base.width) > 1e-9:
        raise InputError(f"{cfg.init}: has width {base.width}, but --width {cfg.width} was given")
    model = SegmentationNet(num_classes, width=base.width)
    model.load_backbone_from(base)
    log(f"backbone initialised from {base.load_report.summary()}")
    return model


def window_roi(patch, shape) -> List[int]:
    """The sliding window's size: the training patch, shrunk to small images (not below 16)."""
    return [min(p, max(16, s)) for p, s in zip(patch, shape)]


def sliding_window_count(shape, roi, overlap: float) -> int:
    """How many windows MONAI's sliding window visits on ``shape`` (after its padding to ``roi``)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    padded = [max(s, r) for s, r in zip(shape, roi)]
    return len(dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, [overlap] * 3)))


def default_window_batch(device, roi) -> int:
    """Windows per forward pass: about 128^3 voxels at once on a CPU (larger batches gain
    little there, and progress would come less often), 8 x 128^3 on a GPU."""
    budget = (8 if torch.device(device).type == "cuda" else 1) * 128 ** 3
    return max(1, budget // int(np.prod(roi)))


def predict_volume(model: SegmentationNet, image: np.ndarray, patch, device, overlap=0.5,
                   precision: Optional[Precision] = None, window_batch: Optional[int] = None,
                   on_windows=None) -> np.ndarray:
    """Softmax probabilities (classes + 1, D, H, W) by MONAI's Gaussian-blended sliding window.

    ``precision`` (default fp32) sets autocast; the model must already be in its memory format
    (``precision.prepare``). ``on_windows(done, total)`` is called after each batch of windows."""
    from monai.inferers import sliding_window_inference
    precision = precision or resolve_precision(device, "fp32")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    roi = window_roi(patch, image.shape)
    total = sliding_window_count(image.shape, roi, overlap)
    done = 0

    def predictor(windows):
        nonlocal done
        logits = model(windows).float()  # MONAI blends in the predictor's dtype: keep it fp32
        done += windows.shape[0]
        if on_windows is not None:
            on_windows(done, total)
        return logits

    with precision.inference():
        logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=window_batch or default_window_batch(device, roi),
                                          predictor=predictor, overlap=overlap, mode="gaussian",
                                          padding_mode="constant", cval=0.0)
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


# ------------------------------------------------------------------------- run


def run_finetune(cfg: FinetuneConfig, progress: str = "auto") -> dict:
    ddp = Distributed(cfg.device)
    reporter = Reporter(progress, enabled=ddp.is_main)
    with error_events(reporter):
        try:
            # One writer per run folder; a second run on the same --out is refused.
            with run_folder_lock(cfg.out, "gvsl finetune", ddp.is_main,
                                 log=lambda message: reporter.event("log", message=message)):
                return _run(cfg, ddp, reporter)
        finally:
            ddp.close()


def _load_cases(pairs, cfg, num_classes, cache_dir):
    cases, presets = [], set()
    for image_path, label_path in pairs:
        image, label, used = preprocess_case(image_path, label_path, cfg.preset, cfg.spacing, num_classes, cache_dir)
        cases.append((image, label))
        presets.add(used)
    return cases, presets


def _run(cfg: FinetuneConfig, ddp: Distributed, reporter: Reporter) -> dict:
    device = ddp.device
    log = (lambda msg: reporter.event("log", message=msg)) if ddp.is_main else (lambda msg: None)
    run_dir = prepare_run_dir(cfg.out, cfg.resume, ddp.is_main, log)
    last = run_dir / "checkpoints" / "last.pt"
    cache_dir = cfg.cache_dir or str(run_dir / "cache")

    pairs = pair_images_and_labels(cfg.images, cfg.labels)
    if cfg.val_images:
        val_pairs = pair_images_and_labels(cfg.val_images, cfg.val_labels or cfg.val_images)
        train_pairs = pairs
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(pairs))
        n_val = int(round(cfg.val_fraction * len(pairs))) if len(pairs) > 1 else 0
        val_pairs = [pairs[i] for i in sorted(order[:n_val])]
        train_pairs = [pairs[i] for i in sorted(order[n_val:])]
    declared = len(cfg.classes) if cfg.classes else None
    train_cases, presets = _load_cases(train_pairs, cfg, declared, cache_dir)
    val_cases, _ = _load_cases(val_pairs, cfg, declared, cache_dir)
    if declared:
        num_classes = declared
    else:
        values = {label_path: set(np.unique(lab).tolist())
                  for (_, label_path), (_, lab) in zip(train_pairs + val_pairs, train_cases + val_cases)}
        num_classes = infer_class_count(values, cfg.labels)
    classes = cfg.classes or [f"class_{k}" for k in range(1, num_classes + 1)]

    torch.manual_seed(cfg.seed)
    model = build_segmentation_model(cfg, num_classes, log).to(device)
    if cfg.mode == "linear":
        model.freeze_backbone()
    precision = resolve_precision(device, cfg.precision)
    precision.prepare(model)
    log(f"precision {precision.label} ({precision.reason})")
    scaler = precision.grad_scaler()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr)
    sampler = CropSampler(train_cases, cfg.patch, cfg.seed * 1000 + ddp.rank, cfg.foreground_crop_fraction)
    metrics = MetricsLog(run_dir / "metrics.jsonl" if ddp.is_main else None)
    start_step, best_dice = 0, None  # None (JSON null): nothing validated yet
    if cfg.resume and last.exists():
        ckpt = resume_state(run_dir, model, optimizer, sampler, ddp, metrics, log, lr=cfg.lr)
        classes = check_resumed_classes(ckpt, classes, cfg.classes is not None, last)
        start_step = int(ckpt["step"])
        saved_best = ckpt.get("best_val_dice")
        # Older runs wrote -1.0 for "never validated".
        best_dice = float(saved_best) if saved_best is not None and float(saved_best) >= 0 else None
    else:
        metrics.set_aside(log)
    if ddp.is_main:
        write_json_atomic(run_dir / "config.json", asdict(cfg))

    from monai.losses import DiceCELoss
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    net = ddp.wrap(model)
    preprocessing = {"preset": presets.pop() if len(presets) == 1 else cfg.preset, "spacing": cfg.spacing,
                     "patch": list(cfg.patch)}

    def payload(step, best, gather=True):
        # gather=False for best.pt, which rank 0 writes alone: it is for inference, and a
        # collective there would wait forever for the other ranks.
        states = gather_sampler_states(ddp, sampler) if gather else [sampler.state()]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "finetune", "model": model.config,
                "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "classes": classes, "mode": cfg.mode, "init": cfg.init, "preprocessing": preprocessing,
                "config": asdict(cfg), "best_val_dice": best, "sampler_states": states}

    def validate(step):
        model.eval()
        dices = []
        for image, label in val_cases:
            probs = predict_volume(model, image.astype(np.float32), cfg.patch, device, precision=precision)
            d = dice_per_label(probs.argmax(0), label, range(1, num_classes + 1))
            dices.append([d[k] for k in range(1, num_classes + 1)])
        model.train()
        per_class = np.nanmean(np.asarray(dices, dtype=float), axis=0)
        return {name: float(v) for name, v in zip(classes, per_class)}

    reporter.event("start", step=start_step, total=cfg.iters, run_dir=str(run_dir), device=str(device),
                   train_cases=len(train_cases), val_cases=len(val_cases), classes=classes, mode=cfg.mode,
                   precision=precision.as_dict())
    clock = EtaClock(start_step, cfg.iters)
    step, stopped, last_val = start_step, False, None
    model.train()
    with StopFlag() as stop:
        while step < cfg.iters:
            t0 = time.perf_counter()
            x_np, y_np = sampler.sample(cfg.batch)
            x = torch.from_numpy(x_np).to(device)
            y = torch.from_numpy(y_np).to(device)
            with precision.autocast():
                logits = net(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seconds = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.iters or step == start_step + 1:
                record = {"step": step, "loss": float(loss.detach()), "lr": cfg.lr, "seconds_per_step": seconds,
                          "samples_per_s": cfg.batch * ddp.world / seconds}
                check_finite_losses({"dice_ce": record["loss"]}, step, run_dir)
                metrics.write(record)
                reporter.event("progress", step=step, total=cfg.iters, loss={"dice_ce": record["loss"]},
                               eta_s=clock.eta(step))
            if val_cases and (step % cfg.val_every == 0 or step == cfg.iters) and ddp.is_main:
                last_val = validate(step)
                mean = float(np.nanmean(list(last_val.values())))
                # A class absent from every validation case has no Dice: null in the log, not NaN.
                metrics.write(finite_or_none({"step": step, "val_dice": last_val, "val_mean_dice": mean}))
                reporter.event("validation", **finite_or_none({"step": step, "dice": last_val, "mean_dice": mean}))
                if np.isfinite(mean) and (best_dice is None or mean > best_dice):
                    best_dice = mean
                    save_atomic(payload(step, best_dice, gather=False), run_dir / "checkpoints" / "best.pt")
            if ddp.any_flag(stop.requested):
                stopped = True
                break
            if step % cfg.ckpt_every == 0 and step < cfg.iters:
                data = payload(step, best_dice)
                if ddp.is_main:
                    reporter.event("checkpoint", step=step, path=str(write_checkpoint(run_dir, data, step, True)))
    data = payload(step, best_dice)
    if ddp.is_main:
        path = write_checkpoint(run_dir, data, step, False)
        if not (run_dir / "checkpoints" / "best.pt").exists():
            # No validation ran (no validation cases): best.pt is the final weights, marked
            # unvalidated (best_val_dice null), so `--checkpoint best.pt` still works.
            save_atomic(data, run_dir / "checkpoints" / "best.pt")
            if not val_cases:
                log(f"no validation cases: {run_dir / 'checkpoints' / 'best.pt'} holds the final weights, not a "
                    f"validated choice (best_val_dice null); give --val-images/--val-labels or a --val-fraction "
                    f"that leaves at least one case to validate")
        reporter.event("checkpoint", step=step, path=str(path))
    summary = {"step": step, "total": cfg.iters, "stopped": stopped, "run_dir": str(run_dir),
               "best_val_dice": best_dice, "last_val_dice": last_val, "classes": classes,
               "rank_parameter_checksums": ddp.parameter_checksums(model)}
    reporter.event("done", **summary)
    return summary


def finetune_cli(args):
    cfg = FinetuneConfig(images=args.images, labels=args.labels, out=args.out, init=args.init, mode=args.mode,
                         classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
                         val_fraction=args.val_fraction, val_images=args.val_images, val_labels=args.val_labels,
                         val_every=args.val_every, patch=args.patch, iters=args.iters, batch=args.batch, lr=args.lr,
                         width=args.width, device=args.device, amp=args.amp, precision=args.precision, seed=args.seed,
                         ckpt_every=args.ckpt_every, log_every=args.log_every, preset=args.preset,
                         spacing=args.spacing, cache_dir=args.cache_dir, resume=args.resume)
    run_finetune(cfg, progress=args.progress)
