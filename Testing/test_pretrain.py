"""Pre-training: learning, stop/resume, torchrun with gloo, progress protocol."""
import json
import os
import subprocess
import sys

import pytest

from conftest import json_events, run_gvsl, sigterm_after_progress
from gvsl.checkpoint import read_checkpoint
from gvsl.pretrain import PretrainConfig, run_pretrain
from gvsl.runtime import RunDirError


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_short_pretraining_lowers_ncc_loss(pair_folder, tmp_path):
    cfg = PretrainConfig(data=str(pair_folder), out=str(tmp_path / "run"), patch=[32, 32, 32], iters=40,
                         batch=2, lr=2e-3, width=0.25, device="cpu", log_every=1, ckpt_every=1000,
                         augment=False, seed=0)
    summary = run_pretrain(cfg, progress="text")
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["ncc"] for r in rows[:5]) / 5
    last = sum(r["ncc"] for r in rows[-5:]) / 5
    assert last < first - 0.02, (first, last)
    for key in ("ncc", "smooth", "mse", "total", "lr", "seconds_per_step", "samples_per_s"):
        assert key in rows[-1]
    config = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert config["width"] == 0.25 and config["patch"] == [32, 32, 32]
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 40 and ckpt["optimizer"]["state"]
    assert summary["stopped"] is False
    # A finished run is never overwritten by accident.
    with pytest.raises(RunDirError, match="already holds a run"):
        run_pretrain(cfg, progress="text")


def test_sigterm_saves_and_resume_continues_at_saved_step(phantom_folder, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", phantom_folder, "--out", out, "--patch", "32", "--iters", "500",
            "--width", "0.25", "--device", "cpu", "--log-every", "1", "--ckpt-every", "1000",
            "--progress", "json", "--spacing", "1.5"]
    returncode, events, err = sigterm_after_progress(args)
    assert returncode == 0, err
    done = [e for e in events if e["event"] == "done"][-1]
    assert done["stopped"] is True
    saved = read_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert saved == done["step"] >= 2

    result = run_gvsl(args[:8] + [saved + 3] + args[9:] + ["--resume"])
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    start = [e for e in events if e["event"] == "start"][0]
    assert start["step"] == saved
    assert any(e["event"] == "log" and "resumed" in e["message"] for e in events)
    assert events[-1]["event"] == "done" and events[-1]["step"] == saved + 3
    steps = [r["step"] for r in metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 3


def test_bad_data_folder_reports_its_own_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.nii.gz").write_bytes(b"not an image")
    result = run_gvsl(["pretrain", "--data", tmp_path / "data", "--out", tmp_path / "run", "--progress", "json",
                       "--device", "cpu"])
    assert result.returncode == 1
    error = [e for e in json_events(result.stdout) if e["event"] == "error"][0]
    assert "broken.nii.gz: unreadable" in error["message"]
    assert "at least 2 usable volumes" in error["message"]
    assert "Traceback" not in result.stderr


def test_two_rank_gloo_run_keeps_parameters_identical(phantom_folder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gvsl",
           "pretrain", "--data", str(phantom_folder), "--out", str(tmp_path / "ddp"), "--patch", "32",
           "--iters", "3", "--width", "0.25", "--device", "cpu", "--progress", "json", "--log-every", "1",
           "--spacing", "1.5"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    done = [e for e in json_events(result.stdout) if e["event"] == "done"]
    assert len(done) == 1  # only rank 0 reports
    checksums = done[0]["rank_parameter_checksums"]
    assert done[0]["world_size"] == 2 and len(checksums) == 2
    assert checksums[0] == checksums[1]
    ckpt = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3 and len(ckpt["sampler_states"]) == 2
    assert ckpt["sampler_states"][0] != ckpt["sampler_states"][1]  # each rank draws its own pairs


def test_cosine_schedule_decays_to_final_lr_and_resume_continues_the_curve(pair_folder, tmp_path):
    from gvsl.pretrain import scheduled_lr
    cfg = PretrainConfig(data=str(pair_folder), out=str(tmp_path / "run"), patch=[16, 16, 16], iters=6,
                         batch=1, lr=1e-3, lr_schedule="cosine", lr_final=1e-5, width=0.25, device="cpu",
                         log_every=1, ckpt_every=3, augment=False, seed=0)
    assert scheduled_lr(cfg, 0) == pytest.approx(1e-3)
    assert scheduled_lr(cfg, 5) == pytest.approx(1e-5)
    assert scheduled_lr(cfg, 1) > scheduled_lr(cfg, 2) > scheduled_lr(cfg, 3)
    run_pretrain(cfg, progress="text")
    first = [r["lr"] for r in metrics(tmp_path / "run")]
    assert first == pytest.approx([scheduled_lr(cfg, s) for s in range(6)])

    # Stopped at step 3 and resumed: the same curve, not a restart from --lr.
    cfg3 = PretrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "resumed"), "iters": 3})
    run_pretrain(cfg3, progress="text")
    resumed = PretrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "resumed"), "resume": True})
    run_pretrain(resumed, progress="text")
    assert [r["lr"] for r in metrics(tmp_path / "resumed")][-3:] == pytest.approx(first[-3:])
    assert PretrainConfig(**{**cfg.__dict__, "lr_schedule": "constant"}).lr == 1e-3
    assert scheduled_lr(PretrainConfig(**{**cfg.__dict__, "lr_schedule": "constant"}), 5) == 1e-3
