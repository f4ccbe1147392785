"""Background ``gvsl`` commands: a child process whose JSON progress events are read by a
thread into a queue. The Qt widget drains :meth:`GVSLJob.poll` from a ``qt.QTimer``, so
Slicer never waits on the child. No Qt here: pytest drives it directly.

Stop protocol (the same on every OS, through any launcher): inside Slicer the command runs
as ``PythonSlicer -m gvsl ...``, and ``PythonSlicer`` is CTK's application launcher, which
starts the real interpreter as *its* child and forwards no signals. So Stop never signals:
it creates the job's stop file (``gvsl.stopfile``; ``STOP`` in the run folder for training),
which the child polls once per step, saves and exits. Only if the child has not exited after
a grace period is the whole process tree killed: the process group (POSIX) or Job Object
(Windows) made when the job started, never one looked up after the launcher was reaped.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from gvsl import stopfile

ON_WINDOWS = os.name == "nt"


def engine_parent_dir() -> str:
    """The folder that holds the ``gvsl`` package, for the child's PYTHONPATH."""
    import gvsl
    return str(Path(gvsl.__file__).resolve().parent.parent)


def python_executable() -> str:
    """PythonSlicer inside Slicer (Slicer's own Python, without the GUI), else this Python."""
    return shutil.which("PythonSlicer") or sys.executable


def job_command(launcher: Union[str, Sequence[str]], args: Sequence[str]) -> List[str]:
    """``[launcher..., -m, gvsl, args...]``; ``launcher`` is an executable or a command prefix."""
    prefix = [launcher] if isinstance(launcher, (str, os.PathLike)) else list(launcher)
    return [str(p) for p in prefix] + ["-m", "gvsl", *[str(a) for a in args]]


class _WindowsJobObject:
    """A Windows Job Object the child is assigned to right after it starts: its
    descendants join it, so terminating the job ends the whole tree even after the
    launcher has exited."""

    def __init__(self):
        import ctypes
        from ctypes import wintypes
        self._kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        self._kernel32.CreateJobObjectW.restype = wintypes.HANDLE
        self._kernel32.CreateJobObjectW.argtypes = (wintypes.LPVOID, wintypes.LPCWSTR)
        self._kernel32.AssignProcessToJobObject.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
        self._kernel32.TerminateJobObject.argtypes = (wintypes.HANDLE, wintypes.UINT)
        self._kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
        self.handle = self._kernel32.CreateJobObjectW(None, None)

    def assign(self, process: subprocess.Popen) -> bool:
        return bool(self.handle) and bool(self._kernel32.AssignProcessToJobObject(self.handle, int(process._handle)))

    def terminate(self):
        if self.handle:
            self._kernel32.TerminateJobObject(self.handle, 1)

    def close(self):
        if self.handle:
            self._kernel32.CloseHandle(self.handle)
            self.handle = None


class GVSLJob:
    """One ``python -m gvsl ARGS --progress json`` child process.

    ``python``: the interpreter or launcher command (default ``PythonSlicer`` if on PATH).
    ``stop_file``: where Stop writes its request (default: a fresh temporary folder's
    ``STOP``); training jobs pass ``<run folder>/STOP``.
    """

    def __init__(self, args: Sequence[str], python: Union[str, Sequence[str], None] = None,
                 env: Optional[Dict[str, str]] = None, stop_file: Union[str, Path, None] = None):
        self.args = [str(a) for a in args]
        if "--progress" not in self.args:
            self.args += ["--progress", "json"]
        self.python = python or python_executable()
        self.env = dict(os.environ if env is None else env)
        parent = engine_parent_dir()
        self.env["PYTHONPATH"] = parent + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONIOENCODING"] = "utf-8"  # the child's messages may name non-ASCII files
        self.stop_file = Path(stop_file) if stop_file else Path(tempfile.mkdtemp(prefix="gvsl-job-")) / stopfile.STOP_FILE_NAME
        self.env[stopfile.STOP_FILE_ENV] = str(self.stop_file)
        self.process: Optional[subprocess.Popen] = None
        self.process_group: Optional[int] = None  # POSIX: remembered at start
        self._windows_job: Optional[_WindowsJobObject] = None
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.history: List[dict] = []
        self.stderr_tail: deque = deque(maxlen=60)
        self._threads: List[threading.Thread] = []
        self.stop_requested = False
        self.killed = False
        self._stop_time = 0.0

    @property
    def command(self) -> List[str]:
        return job_command(self.python, self.args)

    # ----------------------------------------------------------------- control
    def start(self) -> "GVSLJob":
        stopfile.clear(self.stop_file)  # a request left by an earlier run must not stop this one
        kwargs = {}
        if ON_WINDOWS:
            # Hide the console window as slicer.util.launchConsoleProcess does.
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0  # SW_HIDE
            kwargs["startupinfo"] = info
        else:
            kwargs["start_new_session"] = True  # its own process group: the launcher and all it starts
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                                        env=self.env, bufsize=1, **kwargs)
        if ON_WINDOWS:
            try:
                self._windows_job = _WindowsJobObject()
                self._windows_job.assign(self.process)
            except (OSError, AttributeError):
                self._windows_job = None  # taskkill /T on the launcher remains
        else:
            self.process_group = self.process.pid  # start_new_session: the group id is the child's pid
        for target, stream in ((self._read_stdout, self.process.stdout), (self._read_stderr, self.process.stderr)):
            thread = threading.Thread(target=target, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read_stdout(self, stream):
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line) if line.startswith("{") else {"event": "output", "message": line}
            except json.JSONDecodeError:
                event = {"event": "output", "message": line}
            self.events.put(event)

    def _read_stderr(self, stream):
        for line in stream:
            self.stderr_tail.append(line.rstrip("\n"))

    def poll(self) -> List[dict]:
        """Events received since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        self.history += out
        return out

    @property
    def running(self) -> bool:
        """The launcher runs, or something it started still holds its output open (a launcher
        that exited early leaves the real interpreter running)."""
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        return bool(self._threads) and self._threads[0].is_alive()

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        code = self.process.wait(timeout=timeout)
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(timeout=remaining)
            if thread.is_alive():
                raise subprocess.TimeoutExpired(self.command, timeout)
        return code

    def request_stop(self):
        """Ask the child to save and exit, without waiting (what the panel's Stop calls)."""
        if not self.running or self.stop_requested:
            return
        self.stop_requested = True
        self._stop_time = time.monotonic()
        stopfile.request_stop(self.stop_file)

    def kill_if_overdue(self, grace_s: float) -> bool:
        """Kill the process tree if a requested stop has not ended it within ``grace_s``."""
        if self.stop_requested and self.running and time.monotonic() - self._stop_time > grace_s:
            self.kill_tree()
            return True
        return False

    def stop(self, grace_s: float = 60.0) -> Optional[int]:
        """Ask the child to save and exit; kill its process tree if it does not (blocking)."""
        if not self.running:
            self.kill_tree()
            return self.returncode
        self.request_stop()
        try:
            return self.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            return self.wait(timeout=30)
        finally:
            self.kill_tree()  # anything left in the tree once the launcher is gone

    def kill_tree(self):
        """Kill everything the job started, through what was remembered at start."""
        if self.process is None:
            return
        if self.running:
            self.killed = True
        if ON_WINDOWS:
            if self._windows_job is not None:
                self._windows_job.terminate()
            if self.process.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        elif self.process_group is not None:
            try:
                os.killpg(self.process_group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # the group is empty: nothing of the job is left running

    def finish(self):
        """Release what the job holds once it has ended (the panel calls it after the last poll)."""
        self.kill_tree()
        if self._windows_job is not None:
            self._windows_job.close()

    # ----------------------------------------------------------------- results
    def error_message(self) -> Optional[str]:
        """The child's own error message (its ``error`` event, else its last stderr lines)."""
        self.poll()
        errors = [e for e in self.history if e.get("event") == "error"]
        if errors:
            return errors[-1].get("message")
        if self.returncode not in (None, 0):
            return "\n".join(list(self.stderr_tail)[-10:]) or f"exited with code {self.returncode}"
        return None

    def last(self, name: str) -> Optional[dict]:
        self.poll()
        matches = [e for e in self.history if e.get("event") == name]
        return matches[-1] if matches else None
