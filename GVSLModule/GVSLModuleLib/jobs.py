"""Background ``gvsl`` commands: a child process whose JSON progress events are read by a
thread into a queue. The Qt widget drains :meth:`GVSLJob.poll` from a ``qt.QTimer``, so
Slicer never waits on the child. No Qt here: pytest drives it directly.

Stop sends SIGTERM (CTRL_BREAK on Windows): the child saves a checkpoint and exits 0 within
a step. If it has not exited after ``grace_s``, the whole process tree is killed.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def engine_parent_dir() -> str:
    """The folder that holds the ``gvsl`` package, for the child's PYTHONPATH."""
    import gvsl
    return str(Path(gvsl.__file__).resolve().parent.parent)


def python_executable() -> str:
    """PythonSlicer inside Slicer (Slicer's own Python, without the GUI), else this Python."""
    return shutil.which("PythonSlicer") or sys.executable


class GVSLJob:
    """One ``python -m gvsl ARGS --progress json`` child process."""

    def __init__(self, args: Sequence[str], python: Optional[str] = None, env: Optional[Dict[str, str]] = None):
        self.args = [str(a) for a in args]
        if "--progress" not in self.args:
            self.args += ["--progress", "json"]
        self.python = python or python_executable()
        self.env = dict(os.environ if env is None else env)
        parent = engine_parent_dir()
        self.env["PYTHONPATH"] = parent + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONIOENCODING"] = "utf-8"  # the child's messages may name non-ASCII files
        self.process: Optional[subprocess.Popen] = None
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.history: List[dict] = []
        self.stderr_tail: deque = deque(maxlen=60)
        self._threads: List[threading.Thread] = []
        self.stop_requested = False
        self._stop_time = 0.0

    # ----------------------------------------------------------------- control
    def start(self) -> "GVSLJob":
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group: stop reaches the whole tree
        self.process = subprocess.Popen([self.python, "-m", "gvsl", *self.args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                        encoding="utf-8", errors="replace", env=self.env, bufsize=1, **kwargs)
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
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: Optional[float] = None) -> int:
        code = self.process.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def request_stop(self):
        """Ask the child to save and exit, without waiting (what the GUI calls)."""
        if not self.running or self.stop_requested:
            return
        self.stop_requested = True
        self._stop_time = time.monotonic()
        if os.name == "nt":
            self.process.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            self.process.send_signal(signal.SIGTERM)

    def kill_if_overdue(self, grace_s: float) -> bool:
        """Kill the process tree if a requested stop has not ended it within ``grace_s``."""
        if self.stop_requested and self.running and time.monotonic() - self._stop_time > grace_s:
            self.kill_tree()
            return True
        return False

    def stop(self, grace_s: float = 60.0) -> int:
        """Ask the child to save and exit; kill its process tree if it does not (blocking)."""
        if not self.running:
            return self.returncode
        self.request_stop()
        try:
            return self.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            return self.wait(timeout=10)

    def kill_tree(self):
        if self.process is None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        else:
            try:
                os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

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
