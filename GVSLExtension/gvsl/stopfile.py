"""Stop requests through a file, for parents that cannot signal the process that trains.

3D Slicer starts jobs through ``PythonSlicer``, CTK's application launcher, which runs the
real interpreter as its *child* and forwards no signals; on Windows a console control event
may not reach that grandchild either. So the Slicer panel asks for a stop by creating a
file, whose path it passes in the ``GVSL_STOP_FILE`` environment variable (for training
runs, ``STOP`` in the run folder); ``gvsl.runtime.StopFlag`` polls it once per step. No
torch here: the panel imports this module before torch may be installed.

A stop file is honoured whatever its timestamp: on a network share the file server's clock
may differ from this computer's by minutes, so an mtime test would ignore a real request.
A request left over from an earlier run is removed by whoever starts the next one
(:func:`clear`, which ``GVSLModuleLib.jobs.GVSLJob.start`` calls before the child starts).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Optional, Union

STOP_FILE_ENV = "GVSL_STOP_FILE"
STOP_FILE_NAME = "STOP"


class StopFile:
    """``requested()`` is True once the stop file exists (and stays True)."""

    def __init__(self, path: Optional[Union[str, Path]]):
        self.path = Path(path) if path else None
        self._seen = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "StopFile":
        return cls(environ.get(STOP_FILE_ENV) or None)

    def requested(self) -> bool:
        if self._seen or self.path is None:
            return self._seen
        self._seen = self.path.exists()  # no mtime test: see the module docstring
        return self._seen


def request_stop(path: Union[str, Path], reason: str = "stop requested") -> Path:
    """Create the stop file (what the panel's Stop does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{reason} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
    return path


def clear(path: Optional[Union[str, Path]]):
    """Remove a stop file left by an earlier run (before starting a new one)."""
    if path:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass
