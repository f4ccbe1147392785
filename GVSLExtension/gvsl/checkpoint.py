"""Checkpoints: atomic writes, safe loading (never runs pickled code), official weights.

Our checkpoint is a ``torch.save``'d dict that loads with ``weights_only=True``::

    {"format": "gvsl", "format_version": 1, "kind": "pretrain" | "finetune",
     "model": {"width": float, ...}, "state_dict": {...}, "step": int,
     "optimizer": {...} | None, "config": {...}, "preprocessing": {...}, ...}

The official GVSL3D-UNet release is a bare ``state_dict`` (``unet.*`` backbone plus the
heads, or the backbone alone); both are accepted. ``.safetensors`` files hold a bare
state_dict.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch

FORMAT = "gvsl"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


@dataclass
class LoadReport:
    path: str
    source: str  # "gvsl" or "official"
    loaded: List[str] = field(default_factory=list)
    random_init: List[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {self.source} weights, {len(self.loaded)} tensors loaded"
        if self.random_init:
            groups = sorted({k.split(".")[0] for k in self.random_init})
            text += f"; left at random init: {len(self.random_init)} tensors ({', '.join(groups)})"
        return text


def save_atomic(obj, path, verify: bool = False) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``:
    a crash mid-write never leaves a truncated checkpoint behind, and a failed write (a
    full disk) is one clear error that leaves the previous ``path`` as it was. ``verify``
    reads the file back before the rename (for exports, which are written once)."""
    from .safe_io import ResultWriteError, interrupted_by_user, write_failure_reason
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if verify:
                read_checkpoint(tmp)
        except (OSError, RuntimeError, CheckpointError) as exc:
            if interrupted_by_user(exc):  # a second Ctrl-C while torch was writing
                raise KeyboardInterrupt from None
            kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
            raise ResultWriteError(f"{path}: the checkpoint could not be written "
                                   f"({write_failure_reason(exc, path.parent)}){kept}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle (protocol 2 or later)


def _refuse_foreign_file(path: Path):
    """A text file, an image or an empty file is named for what it is before torch tries
    to unpickle it (which would call it "a file that needs arbitrary unpickling")."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (the file is empty)")
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return
    text = head.decode("utf-8", "ignore")
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        kind = f"a text file starting {text.strip().splitlines()[0][:40]!r}" if text.strip() else "a blank text file"
    else:
        kind = f"it starts with bytes {head[:8]!r}"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint ({kind}); expected weights saved by torch.save "
                          f"(.pt/.pth) or a .safetensors file")


def non_finite_tensors(state: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _check_gvsl_checkpoint(obj: dict, path: Path):
    """Our format's promises, checked before anything is built from them."""
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: a GVSL checkpoint without its weights ('state_dict' is missing or empty); "
                              f"the file is damaged or was written by another tool")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: its 'state_dict' holds entries that are not tensors")
    model = obj.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("width"), (int, float)):
        raise CheckpointError(f"{path}: a GVSL checkpoint without its network description ('model' with a "
                              f"'width'); the file is damaged or was written by another tool")
    first = next((k for k in ("unet.inc.double_conv.0.weight", "backbone.inc.double_conv.0.weight") if k in state),
                 None)
    if first is None:
        raise CheckpointError(f"{path}: holds no GVSL backbone weights (first keys: {', '.join(list(state)[:3])})")
    actual = state[first].shape[0] / 32.0
    if abs(float(model["width"]) - actual) > 1e-6:
        raise CheckpointError(f"{path}: says width {model['width']}, but its weights have width {actual:g}; "
                              f"the file is damaged")
    if obj.get("kind") == "finetune":
        classes = model.get("num_classes")
        head = state.get("head.weight")
        if not isinstance(classes, int) or head is None or head.shape[0] != classes + 1:
            raise CheckpointError(f"{path}: says {classes} classes, but its segmentation head does not match; "
                                  f"the file is damaged")


def read_checkpoint(path) -> dict:
    """Load a checkpoint file without running pickled code. Returns our dict format, or
    ``{"format": "state_dict", "state_dict": ...}`` for bare weights. Weights that hold NaN
    or infinity are refused: nothing computed from them would mean anything."""
    obj = _read_checkpoint_unchecked(Path(path))
    bad = non_finite_tensors(obj["state_dict"])
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensors hold NaN or infinity (e.g. {bad[0]}); the "
                              f"weights are unusable (a training run that diverged?)")
    return obj


def _read_checkpoint_unchecked(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return {"format": "state_dict", "state_dict": load_file(str(path))}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    _refuse_foreign_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the file needs arbitrary unpickling (it would import or run code: "
            f"{str(exc).splitlines()[0][:200]}). Only plain tensors are loaded; re-save the weights "
            f"as a state_dict or .safetensors.") from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if "central directory" in reason or "unexpected pos" in reason or isinstance(exc, EOFError):
            reason = "the file is truncated or damaged"
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({reason})") from exc
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        _check_gvsl_checkpoint(obj, path)
        return obj
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return {"format": "state_dict", "state_dict": dict(obj)}
    raise CheckpointError(f"{path}: not a GVSL checkpoint or state_dict (found {type(obj).__name__} "
                          f"without tensor entries)")


def normalize_official_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip DDP's ``module.`` prefix; give a backbone-only file its ``unet.`` prefix."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("inc.") for k in state):
        state = {("unet." + k if k.split(".")[0] in {"inc", "down1", "down2", "down3", "down4",
                                                    "up1", "up2", "up3", "up4"} else k): v
                 for k, v in state.items()}
    return state


def width_of_state_dict(state: Dict[str, torch.Tensor], path) -> float:
    key = "unet.inc.double_conv.0.weight"
    if key not in state:
        raise CheckpointError(f"{path}: no '{key}': not GVSL3D-UNet weights "
                              f"(first keys: {', '.join(list(state)[:5])})")
    return state[key].shape[0] / 32.0


def load_state_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], path, source: str,
                    allow_missing_heads: bool = True) -> LoadReport:
    """Copy matching tensors into ``model``; a shape mismatch or a foreign key is an error."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} tensors are not GVSL parameters "
                              f"(e.g. {', '.join(unknown[:4])})")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"{path}: wrong tensor shapes: " + "; ".join(wrong[:4]))
    missing = [k for k in own if k not in state]
    if missing and not allow_missing_heads:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:4])}")
    if not any(k.startswith("unet.") for k in state):
        raise CheckpointError(f"{path}: holds no backbone ('unet.') weights")
    model.load_state_dict(state, strict=False)
    return LoadReport(str(path), source, loaded=sorted(state), random_init=missing)


def export_weights(source, target, match_window="keep") -> Path:
    """A checkpoint without optimizer and sampler state, for sharing and shipping.
    ``match_window`` (an int, or None for the whole search) sets the correlation head's local
    soft-argmax window of a pre-training checkpoint (:func:`gvsl.network.correlation_flow`):
    the same weights, matched differently; "keep" leaves it as it is."""
    ckpt = read_checkpoint(source)
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{source}: not one of our checkpoints")
    keep = ("format", "format_version", "kind", "model", "state_dict", "step", "config", "preprocessing",
            "classes", "mode", "init", "best_val_dice", "averaged_from")
    exported = {k: v for k, v in ckpt.items() if k in keep}
    if match_window != "keep":
        model = dict(exported.get("model") or {})
        if model.get("matching") != "correlation" or exported.get("kind") == "finetune":
            raise CheckpointError(f"{source}: a match window needs a pre-training checkpoint with the correlation "
                                  f"head (this one: {exported.get('kind')}, matching {model.get('matching', 'official')})")
        from .network import checked_match_window
        model.pop("match_window", None)
        if checked_match_window(match_window) is not None:
            model["match_window"] = checked_match_window(match_window)
        exported["model"] = model
    return save_atomic(exported, target, verify=True)


def average_weights(sources, target) -> Path:
    """One checkpoint whose floating-point weights are the mean of those of ``sources``
    (checkpoints of one run, or of one architecture), without optimizer state.

    Averaging the weights of checkpoints along one run (stochastic weight averaging, Izmailov
    et al., UAI 2018) cancels part of the step-to-step noise of a constant learning rate; on
    this project's held-out pairs it lowered the heatmap error of every averaged window (model
    card). The step, config and preprocessing are those of the last source; ``averaged_from``
    lists the sources. Integer buffers must agree and are copied."""
    sources = [Path(s) for s in sources]
    if len(sources) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    keep = ("format", "format_version", "kind", "model", "step", "config", "preprocessing",
            "classes", "mode", "init")
    total = {}
    reference = None
    for path in sources:
        ckpt = read_checkpoint(path)
        if ckpt["format"] != FORMAT:
            raise CheckpointError(f"{path}: not one of our checkpoints; only those can be averaged")
        if reference is None:
            reference = ckpt
        elif (ckpt.get("kind"), ckpt.get("model")) != (reference.get("kind"), reference.get("model")):
            raise CheckpointError(f"{path}: {ckpt.get('kind')} model {ckpt.get('model')} differs from "
                                  f"{sources[0]}'s {reference.get('kind')} model {reference.get('model')}; "
                                  "only checkpoints of one architecture can be averaged")
        state = ckpt["state_dict"]
        if set(state) != set(reference["state_dict"]):
            missing = sorted(set(reference["state_dict"]) ^ set(state))[:3]
            raise CheckpointError(f"{path}: its weights differ from {sources[0]}'s (e.g. {missing})")
        for key, value in state.items():
            if value.shape != reference["state_dict"][key].shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                      f"{sources[0]} has {tuple(reference['state_dict'][key].shape)}")
            if value.is_floating_point():
                total[key] = total.get(key, 0) + value.double()
            elif not torch.equal(value, reference["state_dict"][key]):
                raise CheckpointError(f"{path}: the integer buffer {key} differs from {sources[0]}'s")
        last = ckpt
    averaged = {key: (total[key] / len(sources)).to(value.dtype) if key in total else value
                for key, value in reference["state_dict"].items()}
    out = {k: v for k, v in last.items() if k in keep}
    out["state_dict"] = averaged
    out["averaged_from"] = [str(path) for path in sources]
    return save_atomic(out, target, verify=True)


def load_model(path, device="cpu"):
    """A :class:`gvsl.GVSL` from one of our checkpoints (pre-training or fine-tuning) or
    from the official GVSL3D-UNet weights. ``model.load_report`` says what was loaded and
    what was left at random initialisation."""
    from .network import GVSL

    ckpt = read_checkpoint(path)
    if ckpt["format"] == FORMAT:
        state = ckpt["state_dict"]
        if ckpt.get("kind") == "finetune":
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            state = {"unet." + k: v for k, v in state.items()}
        model = GVSL(**{k: v for k, v in ckpt["model"].items()
                        if k in ("width", "in_channels", "matching", "match_window")})
        report = load_state_into(model, state, path, "gvsl")
    else:
        state = normalize_official_keys(ckpt["state_dict"])
        model = GVSL(width=width_of_state_dict(state, path))
        report = load_state_into(model, state, path, "official")
    model.load_report = report
    model.checkpoint_meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer")}
    return model.to(device).eval()
