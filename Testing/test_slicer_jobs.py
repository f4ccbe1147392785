"""The background job runner the Slicer panel uses (no Qt needed)."""
import os
import signal
import sys
import time

import pytest

from gvsl.checkpoint import read_checkpoint
from GVSLModuleLib.dependencies import missing_packages, pip_install_arguments, protected_constraints
from GVSLModuleLib.jobs import GVSLJob


def wait_for(job, predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for event in job.poll():
            if predicate(event):
                return event
        if not job.running and job.events.empty():
            return None
        time.sleep(0.05)
    raise TimeoutError


def pretrain_args(data, out, iters):
    return ["pretrain", "--data", data, "--out", out, "--patch", "32", "--iters", iters, "--width", "0.25",
            "--device", "cpu", "--log-every", "1", "--spacing", "1.5"]


def test_progress_stop_and_resume(phantom_folder, tmp_path):
    out = tmp_path / "run"
    job = GVSLJob(pretrain_args(phantom_folder, out, 500)).start()
    assert wait_for(job, lambda e: e.get("event") == "progress" and e["step"] >= 2) is not None
    assert job.stop(grace_s=120) == 0
    saved = read_checkpoint(out / "checkpoints" / "last.pt")["step"]
    done = job.last("done")
    assert done["stopped"] is True and done["step"] == saved
    assert any(e["event"] == "start" for e in job.history)

    resumed = GVSLJob(pretrain_args(phantom_folder, out, saved + 2) + ["--resume"]).start()
    resumed.wait(timeout=300)
    assert resumed.returncode == 0, resumed.error_message()
    assert resumed.last("start")["step"] == saved
    assert resumed.last("done")["step"] == saved + 2


def test_failing_child_surfaces_its_own_message(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.nrrd").write_text("garbage", encoding="utf-8")
    job = GVSLJob(["pretrain", "--data", tmp_path / "data", "--out", tmp_path / "run", "--device", "cpu"]).start()
    assert job.wait(timeout=120) == 1
    message = job.error_message()
    assert "scan.nrrd: unreadable" in message and "at least 2 usable volumes" in message


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_kill_ends_the_whole_process_tree(phantom_folder, tmp_path):
    job = GVSLJob(pretrain_args(phantom_folder, tmp_path / "run", 500)).start()
    assert wait_for(job, lambda e: e.get("event") == "start") is not None
    group = os.getpgid(job.process.pid)
    job.request_stop()  # what the panel's Stop does: returns at once
    assert job.stop_requested
    time.sleep(0.01)
    job.kill_if_overdue(grace_s=0.0)  # the poll timer, once the grace period is over
    code = job.wait(timeout=60)
    assert code in (0, -signal.SIGKILL)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_dependency_install_pins_slicers_own_packages():
    assert missing_packages({"json": "json"}) == []
    assert missing_packages({"surely_not_a_module_xyz": "xyz"}) == ["xyz"]
    pins = protected_constraints()
    assert any(p.startswith("SimpleITK==") for p in pins) and any(p.startswith("numpy==") for p in pins)
    args = pip_install_arguments(["monai>=1.3"])
    constraints = args.split("-c ")[1].strip().strip('"')
    assert "SimpleITK==" in open(constraints, encoding="utf-8").read()
    assert args.startswith("monai>=1.3")


# A launcher like CTK's (PythonSlicer): runs the real interpreter as its child, forwards no
# signals and returns the child's exit code.
LAUNCHER = """import subprocess, sys
sys.exit(subprocess.call([sys.executable] + sys.argv[1:]))
"""
# A launcher that exits at once and leaves the real interpreter running (what a killed or
# crashed launcher leaves behind): the grandchild sleeps, holding the job's output open.
ORPHANING_LAUNCHER = """import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
"""


def launcher(tmp_path, source, name="launcher.py"):
    path = tmp_path / name
    path.write_text(source, encoding="utf-8")
    return [sys.executable, str(path)]


def group_alive(group):
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def drive_like_the_panel(job, grace_s, timeout=300):
    """What the panel's poll timer does after Stop: drain events, kill when overdue."""
    deadline = time.time() + timeout
    while job.running:
        job.poll()
        job.kill_if_overdue(grace_s)
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.05)
    job.poll()
    job.finish()


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_stop_through_a_launcher_that_forwards_no_signals(phantom_folder, tmp_path):
    out = tmp_path / "run"
    job = GVSLJob(pretrain_args(phantom_folder, out, 500), python=launcher(tmp_path, LAUNCHER),
                  stop_file=out / "STOP").start()
    group = job.process_group
    assert wait_for(job, lambda e: e.get("event") == "progress" and e["step"] >= 2) is not None
    job.request_stop()
    assert (out / "STOP").is_file()
    drive_like_the_panel(job, grace_s=120)
    assert not job.killed, "the real training process should have saved and exited by itself"
    assert job.returncode == 0, job.error_message()
    done = job.last("done")
    assert done["stopped"] is True
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == done["step"] < 500
    assert not group_alive(group)  # nothing left running

    # Resume through the same launcher: the stale STOP file must not stop it at once.
    resumed = GVSLJob(pretrain_args(phantom_folder, out, done["step"] + 2) + ["--resume"],
                      python=launcher(tmp_path, LAUNCHER), stop_file=out / "STOP").start()
    assert not (out / "STOP").exists()
    resumed.wait(timeout=300)
    assert resumed.returncode == 0, resumed.error_message()
    assert resumed.last("done")["step"] == done["step"] + 2 and not resumed.last("done")["stopped"]


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_kill_reaches_the_interpreter_after_its_launcher_was_reaped(tmp_path):
    job = GVSLJob(["match", "ignored"], python=launcher(tmp_path, ORPHANING_LAUNCHER)).start()
    group = job.process_group
    assert job.process.wait(timeout=60) == 0  # the launcher is gone (and reaped) ...
    time.sleep(0.2)
    assert job.running and group_alive(group)  # ... the interpreter it started is not
    job.request_stop()
    drive_like_the_panel(job, grace_s=0.5, timeout=60)
    assert job.killed and not job.running
    deadline = time.time() + 10
    while group_alive(group) and time.time() < deadline:
        time.sleep(0.05)
    assert not group_alive(group)


def test_stop_file_is_polled_whatever_its_mtime(tmp_path, monkeypatch):
    """Issue 16 item 11: a stop file written through a network share whose clock is behind
    (mtime an hour before this process started) still stops the child."""
    from gvsl import stopfile
    from gvsl.runtime import StopFlag
    path = tmp_path / "STOP"
    monkeypatch.setenv(stopfile.STOP_FILE_ENV, str(path))
    flag = StopFlag()
    assert not flag.requested
    stopfile.request_stop(path)
    old = time.time() - 3600
    os.utime(path, (old, old))  # the server's clock is an hour behind
    assert flag.requested and flag.requested  # and it stays requested
    monkeypatch.delenv(stopfile.STOP_FILE_ENV)
    assert not StopFlag().requested  # no variable: signals only, as on a terminal


def test_a_stop_file_left_by_an_earlier_run_is_removed_when_the_next_job_starts(tmp_path):
    from gvsl import stopfile
    path = stopfile.request_stop(tmp_path / "run" / "STOP", "left from an earlier run")
    job = GVSLJob(["--help"], stop_file=path)  # any quick command: the file must be gone first
    job.start()
    assert not path.exists()
    job.wait(timeout=120)


def test_job_command_passes_the_stop_file_to_the_child(tmp_path):
    from gvsl import stopfile
    job = GVSLJob(["pretrain", "--out", tmp_path / "run"], python=["/opt/Slicer/bin/PythonSlicer"],
                  stop_file=tmp_path / "run" / "STOP")
    assert job.command[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "gvsl"]
    assert job.command[-2:] == ["--progress", "json"]
    assert job.env[stopfile.STOP_FILE_ENV] == str(tmp_path / "run" / "STOP")


def test_windows_start_hides_the_console_and_kills_through_its_job_object(monkeypatch, tmp_path):
    """The Windows branch, with Popen and the Job Object replaced by fakes (runs on any OS)."""
    import io
    import subprocess
    from GVSLModuleLib import jobs

    class FakeStartupInfo:
        dwFlags, wShowWindow = 0, 1

    class FakeProcess:
        pid = 4242

        def __init__(self, command, **kwargs):
            self.command, self.kwargs = command, kwargs
            self.stdout, self.stderr = io.StringIO('{"event": "start"}\n'), io.StringIO("")
            self.code = None

        def poll(self):
            return self.code

    class FakeJobObject:
        instances = []

        def __init__(self):
            self.assigned, self.terminated, self.closed = None, 0, False
            FakeJobObject.instances.append(self)

        def assign(self, process):
            self.assigned = process
            return True

        def terminate(self):
            self.terminated += 1

        def close(self):
            self.closed = True

    taskkills = []
    monkeypatch.setattr(jobs, "ON_WINDOWS", True)
    monkeypatch.setattr(subprocess, "STARTUPINFO", FakeStartupInfo, raising=False)
    monkeypatch.setattr(subprocess, "STARTF_USESHOWWINDOW", 1, raising=False)
    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: taskkills.append(args))
    monkeypatch.setattr(jobs, "_WindowsJobObject", FakeJobObject)
    job = GVSLJob(["pretrain", "--out", tmp_path], python=["PythonSlicer.exe"], stop_file=tmp_path / "STOP").start()
    info = job.process.kwargs["startupinfo"]
    assert info.dwFlags & 1 and info.wShowWindow == 0  # SW_HIDE, as slicer.util.launchConsoleProcess
    assert "start_new_session" not in job.process.kwargs and "creationflags" not in job.process.kwargs
    job_object = FakeJobObject.instances[-1]
    assert job_object.assigned is job.process
    job.request_stop()
    assert (tmp_path / "STOP").is_file()  # no console event is sent
    job.kill_tree()
    assert job_object.terminated == 1 and taskkills == [["taskkill", "/F", "/T", "/PID", "4242"]]
    job.process.code = 0  # once the launcher has gone, only the Job Object is used
    job.finish()
    assert job_object.terminated == 2 and len(taskkills) == 1 and job_object.closed


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM to oneself is POSIX")
def test_signals_still_request_a_stop(monkeypatch):
    from gvsl import stopfile
    from gvsl.runtime import StopFlag
    monkeypatch.delenv(stopfile.STOP_FILE_ENV, raising=False)
    with StopFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not flag.requested and time.time() < deadline:
            time.sleep(0.01)
        assert flag.requested
