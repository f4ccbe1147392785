"""First-run dependency check. torch comes from Slicer's PyTorch extension (PyTorchUtils),
asked for ``TORCH_REQUIREMENT``; everything else is pip-installed with a constraints file
that pins the packages Slicer ships (SimpleITK, numpy, vtk) and the torch/torchvision the
PyTorch extension installed, so an install can never replace them (MONAI requires a recent
torch and would otherwise pull its own).

Nothing here imports torch: the devices are detected in a child process
(:class:`DeviceProbe`), so a broken torch cannot break the panel, and torch's DLLs are not
loaded into Slicer (on Windows they could then not be replaced by a reinstall)."""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# import name -> pip requirement
REQUIRED = {"monai": "monai>=1.3", "matplotlib": "matplotlib", "safetensors": "safetensors", "tqdm": "tqdm",
            "slicerio": "slicerio"}  # slicerio ships the sample chest CT
PROTECTED = ("SimpleITK", "numpy", "vtk", "torch", "torchvision")
# Passed to PyTorchUtilsLogic.installTorch(torchVersionRequirement=...): MONAI 1.5 and later
# require torch 2.8 or later, and the engine is tested with torch 2.13 and MONAI 1.6.
TORCH_REQUIREMENT = ">=2.8"
# The Slicer releases GVSL supports, from what it is tested with (README, CMakeLists.txt):
# Slicer 5.10 and later, Python 3.12. Slicer 5.6 and 5.8 ship Python 3.9, where pip would
# pick torch 2.8 at most and older MONAI releases the engine has never run with.
MINIMUM_PYTHON = (3, 10)
SUPPORTED_SLICER = "3D Slicer 5.10 or later"


def missing_packages(required: Dict[str, str] = REQUIRED) -> List[str]:
    return [req for name, req in required.items() if importlib.util.find_spec(name) is None]


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def unsupported_python_message(version_info: Sequence[int] = sys.version_info) -> Optional[str]:
    """Why the panel does not install its packages into this Python, or None."""
    if tuple(version_info[:2]) >= MINIMUM_PYTHON:
        return None
    return (f"GVSL supports {SUPPORTED_SLICER}. This Slicer runs Python {version_info[0]}.{version_info[1]}, "
            f"for which pip would install older torch and MONAI releases that GVSL is not tested with. "
            f"Please use {SUPPORTED_SLICER}.")


def protected_constraints() -> List[str]:
    """``name==version`` of every installed protected package (torch and torchvision too,
    once the PyTorch extension has installed them)."""
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def pip_install_arguments(requirements: List[str]) -> str:
    """The argument string for ``slicer.util.pip_install``: the requirements plus a
    constraints file that pins Slicer's own packages."""
    fd, path = tempfile.mkstemp(prefix="gvsl-constraints-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(protected_constraints()) + "\n")
    return " ".join(f'"{r}"' if " " in r else r for r in requirements) + f' -c "{path}"'


def engine_ready() -> bool:
    """Everything the engine imports is installed (checked without importing it)."""
    return torch_available() and not missing_packages()


def install_failure_message(error: BaseException, what: List[str]) -> str:
    """What the panel shows when installing fails: the packages, the command's exit status
    and the last lines of its output (``slicer.util.pip_install`` raises
    ``subprocess.CalledProcessError``, whose output Slicer logs to the Python console only)."""
    lines = [f"Installing {', '.join(what)} failed: {type(error).__name__}"]
    if isinstance(error, subprocess.CalledProcessError):
        command = error.cmd if isinstance(error.cmd, str) else " ".join(map(str, error.cmd or []))
        lines[0] += f" (exit status {error.returncode})"
        lines.append(f"command: {command}")
        # Slicer 5.6 to 5.10 (slicer.util.logProcessOutput) pass the process's exhausted
        # stdout *stream* as output: only text is shown, the lines come from the capture.
        output = "\n".join(part.decode("utf-8", "replace") if isinstance(part, bytes) else part
                           for part in (error.output, error.stderr) if isinstance(part, (str, bytes)) and part)
        tail = [line for line in output.splitlines() if line.strip()][-12:]
        if tail:
            lines += ["", *tail]
        else:
            lines += _captured_tail(error)
    else:
        if str(error):
            lines.append(str(error))
        lines += _captured_tail(error)
    lines += ["", "The full output is in the Python console (View -> Python Console)."]
    return "\n".join(lines)


def _captured_tail(error: BaseException) -> List[str]:
    captured = getattr(error, "gvsl_captured_output", "")
    tail = [line for line in captured.splitlines() if line.strip()][-12:]
    return ["", *tail] if tail else []


class _Tee(io.TextIOBase):
    """Writes to ``stream`` and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text) if self.stream is not None else len(text)

    def flush(self):
        if self.stream is not None:
            self.stream.flush()


def run_capturing_output(install: Callable, *args, **kwargs):
    """Call ``install`` (``slicer.util.pip_install``, ``installTorch``) with what it prints
    still going to the Python console, and a copy kept: Slicer prints pip's output line by
    line and raises ``CalledProcessError`` without it. On failure the copy is attached to
    the exception as ``gvsl_captured_output`` for :func:`install_failure_message`."""
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            return install(*args, **kwargs)
    except Exception as exc:
        exc.gvsl_captured_output = tee.copy.getvalue()
        raise


# -------------------------------------------------------------------- devices
_PROBE = (
    "import json, sys\n"
    "import torch\n"
    "found = ['cpu']\n"
    "if torch.cuda.is_available():\n"
    "    found += ['cuda: ' + torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]\n"
    "mps = getattr(torch.backends, 'mps', None)\n"
    "if mps is not None and mps.is_available():\n"
    "    found.append('mps')\n"
    "print(json.dumps({'torch': torch.__version__, 'devices': found}))\n")


class DeviceProbe:
    """torch's devices, found by a child process (``python`` -c ...), never in Slicer's own.
    :meth:`start` returns at once; :meth:`poll` returns None while the child runs, then
    ``(text, ok)``: "Detected: cpu, cuda: <name>" or why torch does not work."""

    def __init__(self, python: Optional[Sequence[str]] = None, timeout_s: float = 120.0,
                 env: Optional[Dict[str, str]] = None):
        from .jobs import python_executable
        self.command = [*(python or [python_executable()]), "-c", _PROBE]
        self.timeout_s, self.env = timeout_s, env
        self.process: Optional[subprocess.Popen] = None
        self._started = 0.0
        self.result: Optional[Tuple[str, bool]] = None

    def start(self) -> "DeviceProbe":
        import time
        kwargs = {}
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0  # SW_HIDE
            kwargs["startupinfo"] = info
        self._started = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                                        env=self.env, **kwargs)
        return self

    def poll(self) -> Optional[Tuple[str, bool]]:
        import time
        if self.result is not None or self.process is None:
            return self.result
        if self.process.poll() is None:
            if time.monotonic() - self._started < self.timeout_s:
                return None
            self.process.kill()
            self.process.communicate()
            self.result = (f"PyTorch did not answer within {self.timeout_s:.0f} s", False)
            return self.result
        out, err = self.process.communicate()
        self.result = probe_result(self.process.returncode, out, err)
        return self.result

    def wait(self, timeout_s: float = 120.0) -> Tuple[str, bool]:
        import time
        deadline = time.monotonic() + timeout_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.poll() or ("PyTorch did not answer", False)


def probe_result(returncode: int, stdout: str, stderr: str) -> Tuple[str, bool]:
    """The device label's text from the probe's output."""
    for line in reversed((stdout or "").splitlines()):
        if line.startswith("{"):
            try:
                answer = json.loads(line)
                return "Detected: " + ", ".join(answer["devices"]) + f" (torch {answer['torch']})", True
            except (ValueError, KeyError):
                break
    lines = [line for line in (stderr or "").splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {returncode}"
    return f"PyTorch is installed but does not work: {reason}. Click Install to reinstall it.", False
