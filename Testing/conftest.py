"""Shared fixtures. Tests run on the CPU with small widths and volumes."""
import os
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "GVSLModule"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", message="Using a non-tuple sequence")


@pytest.fixture(scope="session")
def tiny_model():
    import torch
    import gvsl
    torch.manual_seed(0)
    return gvsl.GVSL(width=0.25).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model):
    """A tiny model saved in our checkpoint format."""
    from gvsl.checkpoint import FORMAT, FORMAT_VERSION, save_atomic
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_atomic({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "pretrain",
                 "model": tiny_model.config, "state_dict": tiny_model.state_dict(), "step": 0}, path)
    return path


@pytest.fixture(scope="session")
def phantom_folder(tmp_path_factory):
    """Three small synthetic CT phantoms of different anatomy and geometry."""
    import SimpleITK as sitk
    from gvsl.samples import synthetic_volume
    folder = tmp_path_factory.mktemp("phantoms")
    for seed in range(3):
        image, _ = synthetic_volume(size=(36, 34, 32), spacing=(1.0, 1.1, 1.2), seed=seed)
        sitk.WriteImage(image, str(folder / f"phantom_{seed}.nii.gz"))
    return folder


@pytest.fixture(scope="session")
def pair_folder(tmp_path_factory):
    """Two small synthetic volumes for the training tests."""
    import SimpleITK as sitk
    from gvsl.samples import synthetic_volume
    folder = tmp_path_factory.mktemp("pair")
    for seed in (0, 1):
        image, _ = synthetic_volume(size=(32, 32, 32), seed=seed, n_blobs=6)
        sitk.WriteImage(image, str(folder / f"v{seed}.nii.gz"))
    return folder


def run_gvsl(args, timeout=600, **kw):
    """``python -m gvsl ARGS`` in a child process; returns CompletedProcess."""
    import subprocess
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "gvsl", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout, env=env, **kw)


def json_events(stdout):
    import json
    events = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def sigterm_after_progress(args, min_step=2, timeout=300):
    """Start ``python -m gvsl ARGS --progress json``, send SIGTERM once a progress event
    reaches ``min_step``; returns (returncode, events, stderr)."""
    import json
    import signal
    import subprocess
    import time
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "gvsl", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=env)
    events = []
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith("{"):
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and events[-1]["step"] >= min_step:
                proc.send_signal(signal.SIGTERM)
                break
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError("no progress event in time")
    rest, err = proc.communicate(timeout=120)
    return proc.returncode, events + json_events(rest), err


def write_shifted_pair(folder, size, seed, shift_mm, moving_name="moving.nrrd"):
    """``folder``/fixed.nrrd (a synthetic CT, 1.5 mm) and ``moving_name``, the same volume shifted
    by ``shift_mm`` (LPS): a pair whose answer is known, for the web front end's tests."""
    import SimpleITK as sitk
    from gvsl.samples import synthetic_volume
    folder.mkdir(parents=True, exist_ok=True)
    fixed, _ = synthetic_volume(size=size, spacing=(1.5, 1.5, 1.5), seed=seed)
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, shift_mm), sitk.sitkLinear, -1000.0)
    sitk.WriteImage(fixed, str(folder / "fixed.nrrd"))
    sitk.WriteImage(moving, str(folder / moving_name))
    return folder
