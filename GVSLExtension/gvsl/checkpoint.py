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


def save_atomic(obj, path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``:
    a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_checkpoint(path) -> dict:
    """Load a checkpoint file without running pickled code. Returns our dict format, or
    ``{"format": "state_dict", "state_dict": ...}`` for bare weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return {"format": "state_dict", "state_dict": load_file(str(path))}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the file needs arbitrary unpickling (it would import or run code: "
            f"{str(exc).splitlines()[0][:200]}). Only plain tensors are loaded; re-save the weights "
            f"as a state_dict or .safetensors.") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
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


def export_weights(source, target) -> Path:
    """A checkpoint without optimizer and sampler state, for sharing and shipping."""
    ckpt = read_checkpoint(source)
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{source}: not one of our checkpoints")
    keep = ("format", "format_version", "kind", "model", "state_dict", "step", "config", "preprocessing",
            "classes", "mode", "init", "best_val_dice")
    return save_atomic({k: v for k, v in ckpt.items() if k in keep}, target)


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
        model = GVSL(**{k: v for k, v in ckpt["model"].items() if k in ("width", "in_channels")})
        report = load_state_into(model, state, path, "gvsl")
    else:
        state = normalize_official_keys(ckpt["state_dict"])
        model = GVSL(width=width_of_state_dict(state, path))
        report = load_state_into(model, state, path, "official")
    model.load_report = report
    model.checkpoint_meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer")}
    return model.to(device).eval()
