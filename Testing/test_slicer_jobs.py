"""The background job runner the Slicer panel uses (no Qt needed)."""
import os
import signal
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
