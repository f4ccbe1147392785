"""First-run dependency check. torch comes from Slicer's PyTorch extension (PyTorchUtils);
everything else is pip-installed with a constraints file that pins the packages Slicer
ships (SimpleITK, numpy, vtk), so an install can never replace them."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import tempfile
from typing import Dict, List

# import name -> pip requirement
REQUIRED = {"monai": "monai>=1.3", "matplotlib": "matplotlib", "safetensors": "safetensors", "tqdm": "tqdm",
            "slicerio": "slicerio"}  # slicerio ships the sample chest CT
PROTECTED = ("SimpleITK", "numpy", "vtk")


def missing_packages(required: Dict[str, str] = REQUIRED) -> List[str]:
    return [req for name, req in required.items() if importlib.util.find_spec(name) is None]


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def protected_constraints() -> List[str]:
    """``name==version`` of every installed protected package."""
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
        output = "\n".join(str(part) for part in (error.output, error.stderr) if part)
        tail = [line for line in output.splitlines() if line.strip()][-12:]
        if tail:
            lines += ["", *tail]
    elif str(error):
        lines.append(str(error))
    lines += ["", "The full output is in the Python console (View -> Python Console)."]
    return "\n".join(lines)
