"""First-run dependency check. torch comes from Slicer's PyTorch extension (PyTorchUtils);
everything else is pip-installed with a constraints file that pins the packages Slicer
ships (SimpleITK, numpy, vtk), so an install can never replace them."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
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
