"""What every long-running command shares: device choice, torchrun/DDP, stop signals,
the progress protocol, metrics and atomic checkpoints with resume.

Progress protocol (``--progress json``): one JSON object per line on stdout::

    {"event": "start", "total": N, "step": s0, "run_dir": ..., "device": ...}
    {"event": "progress", "step": s, "total": N, "loss": {...}, "eta_s": t}
    {"event": "checkpoint", "step": s, "path": ...}
    {"event": "done", "step": s, "stopped": bool, ...}
    {"event": "error", "message": ...}

The Slicer panel reads exactly this.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import save_atomic
from .stopfile import StopFile


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple MPS, then the CPU; an unavailable choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("--device mps was asked for, but Apple MPS is not available")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise RuntimeError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


class Distributed:
    """torchrun's environment, if any: NCCL on GPUs, gloo on CPUs."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            if device_name in ("auto", "cuda") and torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
                backend = "nccl"
            else:
                self.device = torch.device("cpu")
                backend = "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend)
        else:
            self.device = pick_device(device_name)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if any rank's flag is set (stop requests reach rank 0 only)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def parameter_checksums(self, model) -> list:
        """Per-rank sum of |parameters| (float64): equal on all ranks when in sync."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for p in model.parameters():
            total += p.detach().double().abs().sum()
        if self.world == 1:
            return [float(total)]
        gathered = [torch.zeros_like(total) for _ in range(self.world)]
        dist.all_gather(gathered, total)
        return [float(g) for g in gathered]

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class StopFlag:
    """Ctrl-C / SIGTERM request a stop; the loop saves and exits 0 after the current step."""
    # A second Ctrl-C aborts at once, for a user who does not want to wait for the save.

    def __init__(self):
        self._signalled = False
        self._previous = {}
        self._stop_file = StopFile.from_environment()  # the Slicer panel's Stop (gvsl.stopfile)

    @property
    def requested(self) -> bool:
        return self._signalled or self._stop_file.requested()

    def _handler(self, signum, frame):
        if self._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signalled = True

    def __enter__(self):
        # SIGBREAK: Ctrl-Break in a Windows console (the Slicer panel uses the stop file instead).
        for sig in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (tests): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Reporter:
    """Progress on a terminal (tqdm on stderr) or as JSON lines on stdout; rank 0 only."""

    def __init__(self, mode: str = "auto", enabled: bool = True):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "text"
        self.mode = mode
        self.enabled = enabled
        self._bar = None
        self._t0 = time.perf_counter()
        self._last_text = 0.0

    def event(self, name: str, **fields):
        if not self.enabled:
            return
        if self.mode == "json":
            sys.stdout.write(json.dumps({"event": name, **fields}, default=float) + "\n")
            sys.stdout.flush()
            return
        if name == "progress":
            self._progress_human(fields)
        elif name == "error":
            pass  # the command line prints the error itself
        else:
            if self._bar is not None and name == "done":
                self._bar.close()
                self._bar = None
            detail = ", ".join(f"{k}={v}" for k, v in fields.items() if k not in ("loss",))
            print(f"[{name}] {detail}", file=sys.stderr, flush=True)

    def _progress_human(self, fields):
        loss = " ".join(f"{k}={v:.4f}" for k, v in fields.get("loss", {}).items())
        if self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=fields["total"], initial=fields["step"] - 1, unit="step", file=sys.stderr)
            self._bar.n = fields["step"]
            self._bar.set_postfix_str(loss)
            self._bar.refresh()
        elif time.perf_counter() - self._last_text > 5 or fields["step"] == fields["total"]:
            self._last_text = time.perf_counter()
            print(f"step {fields['step']}/{fields['total']} {loss} eta {fields.get('eta_s', 0):.0f}s",
                  file=sys.stderr, flush=True)


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (strict JSON: a NaN
    would make the whole file unreadable to other tools)."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def write(self, record: dict):
        if self.path is None:
            return
        from .safe_io import ResultWriteError, strict_json, write_failure_reason
        line = strict_json(record, f"{self.path} (step {record.get('step')})")
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError as exc:
            raise ResultWriteError(f"{self.path}: cannot append ({write_failure_reason(exc, self.path.parent)})") \
                from None

    def truncate_after(self, step: int, log=None):
        """On resume, drop lines logged after the checkpoint so the log has no repeats, and
        lines a crash cut short (they are not JSON)."""
        if self.path is None or not self.path.exists():
            return
        from .safe_io import StagedFiles
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        if torn and log:
            log(f"{self.path}: dropped {torn} incomplete line(s) that an interrupted write left")
        with StagedFiles(self.path.parent) as stage:
            stage.write_text(self.path.name, "".join(line + "\n" for line in kept))

    def set_aside(self, log=None):
        """A fresh run in a folder whose earlier run never saved a checkpoint: keep that
        log as ``metrics.jsonl.previous`` instead of appending to it."""
        if self.path is None or not self.path.exists():
            return
        previous = self.path.with_name(self.path.name + ".previous")
        os.replace(self.path, previous)
        if log:
            log(f"{self.path}: an earlier run without a checkpoint logged here; its lines are kept in {previous.name}")


class EtaClock:
    def __init__(self, start_step: int, total: int):
        self.start_step, self.total = start_step, total
        self.t0 = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)


class RunDirError(RuntimeError):
    pass


STALE_CHECKPOINT_TEMPORARIES = ("*.pt.*.tmp",)  # what save_atomic leaves when killed mid-write


def prepare_run_dir(out, resume: bool, is_main: bool, log=None) -> Path:
    """The run folder; an existing run is only continued with ``--resume``, never
    overwritten, and ``--resume`` needs a run to continue. Call it while holding the
    folder's :class:`gvsl.safe_io.RunLock` (see :func:`run_folder_lock`): it removes the
    temporary checkpoint files that killed writers left."""
    run_dir = Path(out)
    last = run_dir / "checkpoints" / "last.pt"
    if last.exists() and not resume:
        raise RunDirError(f"{run_dir}: already holds a run (checkpoints/last.pt); pass --resume to "
                          f"continue it or choose a new --out")
    if resume and not last.exists():
        raise RunDirError(f"{run_dir}: --resume found no run to continue (no checkpoints/last.pt); "
                          f"drop --resume to start a new run there, or give the run's folder as --out")
    if is_main:
        from .safe_io import ResultWriteError, remove_stale_temporaries, write_failure_reason
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultWriteError(f"{run_dir}: cannot create the run folder ({write_failure_reason(exc, run_dir)}); "
                                   f"choose another --out") from None
        remove_stale_temporaries(run_dir / "checkpoints", STALE_CHECKPOINT_TEMPORARIES, log)
        remove_stale_temporaries(run_dir, log=log)
        remove_stale_temporaries(run_dir / "cache", log=log)  # the default cache lives in the locked folder
    return run_dir


def run_folder_lock(out, command: str, is_main: bool, log=None):
    """Rank 0 owns ``out`` for the whole run (torchrun stops the other ranks if it is refused)."""
    from .safe_io import RunLock
    return RunLock(out, command, log=log, enabled=is_main)


def gather_sampler_states(ddp: "Distributed", sampler) -> list:
    """Every rank's sampler RNG state (collective under torchrun)."""
    if ddp.world == 1:
        return [sampler.state()]
    states = [None] * ddp.world
    dist.all_gather_object(states, sampler.state())
    return states


# How a mismatching part of a checkpoint's network is chosen on the command line.
ARCHITECTURE_OPTIONS = {"width": "--width", "num_classes": "--classes (number of classes)",
                        "in_channels": "input channels"}


def resume_state(run_dir: Path, model, optimizer, sampler, ddp: "Distributed", metrics: "MetricsLog", log,
                 lr: Optional[float] = None):
    """Load ``last.pt`` into model, optimizer and this rank's sampler; returns the checkpoint
    dict (its ``step`` is where training continues). A checkpoint of another architecture is
    one line naming the option, not torch's list of every mismatching tensor."""
    from .checkpoint import CheckpointError, read_checkpoint
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = read_checkpoint(last)
    saved = ckpt.get("model") or {}
    for key, value in model.config.items():
        if key in saved and saved[key] != value:
            option = ARCHITECTURE_OPTIONS.get(key, key)
            raise RunDirError(f"{last}: the run was started with {option} {saved[key]}, this command asks for "
                              f"{value}; resume with {option} {saved[key]}, or start a new run in another --out")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{last}: does not fit this run's network ({len(first)} problems, first: "
                              f"{first[1].strip() if len(first) > 1 else first[0][:200]}); resume with the "
                              f"options the run was started with") from None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{last}: its optimizer state does not fit this run ({str(exc)[:120]}); was the "
                              f"run started with another --mode?") from None
    # The optimizer state brings the run's old learning rate; the command's --lr wins (the
    # divergence message says "resume with a lower --lr").
    for group in optimizer.param_groups:
        group["lr"] = lr if lr is not None else group["lr"]
    states = ckpt.get("sampler_states") or []
    if ddp.rank < len(states):
        sampler.set_state(states[ddp.rank])
    metrics.truncate_after(int(ckpt["step"]), log=log)
    log(f"resumed {last} at step {int(ckpt['step'])}")
    return ckpt


# Bytes that one training step of GVSL keeps per voxel of a patch, for backward, in fp32:
# ACTIVATION_BYTES[0] + ACTIVATION_BYTES[1] * width, fitted to what torch saves for the backward
# pass (saved-tensor hooks) at 16^3 and 32^3 patches, widths 0.25 (1800 B) and 1.0 (6190 B).
ACTIVATION_BYTES = (340.0, 5850.0)


def available_memory(device) -> Optional[int]:
    """Bytes free for this process on ``device``: CUDA's free memory; on a CPU the smaller of
    the system's MemAvailable and what the cgroup limit leaves; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    free = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    free.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            used = int(open(used_file).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            free.append(max(0, int(limit) - used))
        break
    return min(free) if free else None


def training_memory_estimate(patch, batch: int, width: float, parameters: int, low_precision: bool) -> float:
    """Bytes one training step needs: saved activations (half in bf16/fp16 autocast, whose
    convolutions keep 16-bit outputs) plus weights, gradients and Adam's two moments."""
    per_voxel = ACTIVATION_BYTES[0] + ACTIVATION_BYTES[1] * width
    voxels = float(np.prod([int(p) for p in patch])) * batch
    return voxels * per_voxel * (0.5 if low_precision else 1.0) + 4.0 * 4.0 * parameters


def check_training_patch(patch, batch: int, width: float, model, device, precision, arrays=(), warn=None):
    """Refuse a ``--patch``/``--batch`` whose step cannot fit in the device's free memory
    (the kernel's OOM killer would end the run without a word), suggesting a size that fits;
    warn when the patch is larger than every training volume along an axis (mostly padding)."""
    parameters = sum(p.numel() for p in model.parameters())
    low = precision.autocast_dtype is not None
    need = training_memory_estimate(patch, batch, width, parameters, low)
    free = available_memory(device)
    shown = "x".join(str(int(p)) for p in patch)
    if free is not None and need > free:
        side = 16
        while training_memory_estimate([side + 16] * 3, batch, width, parameters, low) <= free:
            side += 16
        fits = training_memory_estimate([16] * 3, batch, width, parameters, low) <= free
        advice = (f"--patch {side} fits (about {training_memory_estimate([side] * 3, batch, width, parameters, low) / 1e9:.1f} GB)"
                  if fits else "not even --patch 16 fits; free memory or use a smaller --width")
        raise MemoryError(f"--patch {shown} --batch {batch} at width {width:g} needs about {need / 1e9:.1f} GB for one "
                          f"training step, {device} has {free / 1e9:.1f} GB free; {advice}")
    if arrays and warn is not None:
        largest = np.max([a.shape for a in arrays], axis=0)
        if any(int(p) > int(s) for p, s in zip(patch, largest)):
            warn(f"--patch {shown} is larger than every training volume along an axis (largest "
                 f"{'x'.join(map(str, largest))} voxels after resampling): the crops are mostly padding; "
                 f"a patch of at most {'x'.join(str(max(16, int(s) // 16 * 16)) for s in largest)} would do")
    return need


class TrainingDivergedError(RuntimeError):
    pass


def check_finite_losses(values: dict, step: int, run_dir: Path):
    """A NaN loss means the weights are already lost; stop before they overwrite ``last.pt``."""
    bad = [k for k, v in values.items() if not math.isfinite(float(v))]
    if bad:
        raise TrainingDivergedError(f"step {step}: the loss is not finite ({', '.join(bad)}): training diverged; "
                                    f"{run_dir / 'checkpoints' / 'last.pt'} keeps the last good weights (if any): "
                                    f"resume with a lower --lr")


# The mixed-precision scaler halves its scale at every step whose gradients are not finite and
# skips that step; from its initial 2^16, a scale under this means 26 skipped steps in a row.
COLLAPSED_GRAD_SCALE = 2.0 ** -10


def check_grad_scale(scale: float, step: int, run_dir: Path):
    """A run whose every step is skipped for non-finite gradients would otherwise go on, log
    falling losses of a model that never changes, and save the same weights again and again."""
    if scale < COLLAPSED_GRAD_SCALE:
        raise TrainingDivergedError(f"step {step}: the gradients were not finite for many steps in a row "
                                    f"(mixed-precision scale {scale:.3g}): no step changed the weights since; "
                                    f"{run_dir / 'checkpoints' / 'last.pt'} keeps the last saved ones. Try "
                                    f"--precision fp32 to see which loss term gives the non-finite gradient")


def write_checkpoint(run_dir: Path, payload: dict, step: int, periodic: bool) -> Path:
    from .checkpoint import non_finite_tensors
    ckpt_dir = run_dir / "checkpoints"
    bad = non_finite_tensors(payload["state_dict"])
    if bad:
        raise TrainingDivergedError(f"step {step}: {len(bad)} weight tensors are NaN or infinite (training "
                                    f"diverged); not saved, so {ckpt_dir / 'last.pt'} keeps the last good weights "
                                    f"(if any): resume with a lower --lr")
    path = save_atomic(payload, ckpt_dir / "last.pt")
    if periodic:
        save_atomic(payload, ckpt_dir / f"step_{step:07d}.pt")
    return path


@contextmanager
def error_events(reporter: Reporter):
    """Report an exception as an ``error`` event (and re-raise for the exit status)."""
    try:
        yield
    except Exception as exc:
        reporter.event("error", message=str(exc) or type(exc).__name__, type=type(exc).__name__)
        raise


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AMX tiles or AVX-512-BF16), as torch
    itself detects it, and oneDNN can use it. Without these units bf16 is emulated and slower."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        native = any(probe() for probe in probes if probe is not None)
        return bool(native and torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without these probes: assume none
        return False


@dataclass(frozen=True)
class Precision:
    """How a model runs on one device: the autocast dtype (None = plain fp32), the memory
    format of activations and convolution weights, and whether gradients need scaling.

    Only the network's convolutions run in the low-precision dtype: the network keeps its
    affine head, fields and sampling grids in fp32, losses are computed outside autocast,
    and parameters and optimizer state stay fp32 (autocast casts copies)."""

    name: str  # the resolved choice: fp32 | bf16 | fp16
    device_type: str
    autocast_dtype: Optional[torch.dtype]
    channels_last: bool
    needs_grad_scaler: bool
    reason: str = ""

    @property
    def label(self) -> str:
        """Short description for tables and logs, e.g. ``bf16 channels-last``."""
        return f"{self.name} {'channels-last' if self.channels_last else 'contiguous'}"

    def as_dict(self) -> dict:
        return {"precision": self.name, "channels_last": self.channels_last,
                "grad_scaler": self.needs_grad_scaler, "reason": self.reason}

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    @contextmanager
    def inference(self):
        """No gradients, autocast as chosen."""
        with torch.no_grad(), self.autocast():
            yield

    def grad_scaler(self) -> "torch.amp.GradScaler":
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)

    def prepare(self, model):
        """Put ``model``'s convolution weights (and so its activations) in the chosen memory
        format; returns the model. Parameter names and values are unchanged."""
        from .network import use_channels_last
        return use_channels_last(model, self.channels_last)


def resolve_precision(device, requested: str = "auto") -> Precision:
    """The precision and memory format to run on ``device``, for inference and training.

    ``auto``: bf16 autocast on CPUs with native bf16 units and on GPUs that support bf16,
    fp16 with gradient scaling on other CUDA GPUs, fp32 otherwise (Apple MPS included).
    On an AVX-512-BF16 CPU without AMX, bf16 was faster than fp32 only in channels-last
    (training step 1.7x faster; in the plain layout bf16 was ~3x slower): the two go together.
    Channels-last 3D on CPUs (oneDNN's convolutions are faster in it, in fp32 and bf16,
    at width 0.25 and 1.0: see the README's benchmarks) and with autocast on CUDA
    (tensor cores want channels last); plain layout for fp32 on GPUs and on MPS.
    An explicit choice the device cannot run raises ``ValueError``.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    kind = device.type
    if requested == "auto":
        if kind == "cpu":
            name = "bf16" if cpu_has_native_bf16() else "fp32"
            reason = ("this CPU has native bf16 (AMX or AVX-512-BF16)" if name == "bf16"
                      else "no native bf16 on this CPU")
        elif kind == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            reason = "GPU with bf16" if name == "bf16" else "GPU without bf16: fp16 with gradient scaling"
        else:
            name, reason = "fp32", f"{kind}: fp32"
    else:
        name, reason = requested, "asked for"
        if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU does not support bf16; use fp16 or auto")
        if name == "bf16" and kind == "cpu" and not cpu_has_native_bf16():
            reason = "asked for (this CPU emulates bf16: expect it to be slower than fp32)"
    if kind == "cpu":
        channels_last = True
    elif kind == "cuda":
        channels_last = name != "fp32"
    else:
        channels_last = False
    # fp16 needs loss scaling for its range. bf16 does not, but on a CPU the scaler's other
    # half is kept: it skips a step whose gradients are not finite. oneDNN's bf16 convolution
    # backward now and then returned NaN weight gradients on an AVX-512-BF16 CPU (not
    # reproducible op by op), and one such step would otherwise poison every weight.
    scaler = name == "fp16" or (name == "bf16" and kind == "cpu")
    return Precision(name=name, device_type=kind, autocast_dtype=_AUTOCAST_DTYPES[name],
                     channels_last=channels_last, needs_grad_scaler=scaler, reason=reason)


def autocast_context(device: torch.device, enabled: bool):
    """Autocast with the device's ``auto`` precision when ``enabled`` (GPUs only, as before
    ``--precision`` existed); new code uses :func:`resolve_precision`."""
    if not enabled or device.type == "cpu":
        return nullcontext()
    return resolve_precision(device, "auto").autocast()
