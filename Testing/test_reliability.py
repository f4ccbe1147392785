"""Issue 12: nothing lost, nothing silently wrong. One test per case of the issue, each
starting from the input that used to lose work or write a wrong result, and checking the
message and what is on disk afterwards."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import gvsl
from gvsl.checkpoint import FORMAT, CheckpointError, read_checkpoint, save_atomic
from gvsl.cli import main as gvsl_main
from gvsl.data import InputError, InputWarning, load_training_volumes, read_image
from gvsl.match import match_pair
from gvsl.safe_io import LOCK_NAME, TEMP_PREFIX, NonFiniteError, RunLock
from gvsl.samples import synthetic_volume

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------ helpers


def run_cli(capsys, *args):
    """``gvsl ARGS`` in this process (no interpreter start-up); (exit code, stdout, stderr)."""
    code = gvsl_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1, stderr
    return lines[0]


def digest(folder):
    """{relative path: sha1} of every file under ``folder``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def tmpfs(path, size):
    """A small RAM disk at ``path`` (root only): a disk that really fills up."""
    if not ROOT:
        pytest.skip("mounting a small tmpfs to fill a disk needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder, leave_bytes):
    """Use up a file system but ``leave_bytes``."""
    free = shutil.disk_usage(folder).free
    with open(Path(folder) / "filler.bin", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))


def pretrain_args(data, out, iters, *extra):
    return ["pretrain", "--data", data, "--out", out, "--patch", "16", "--iters", iters, "--width", "0.25",
            "--device", "cpu", "--spacing", "1.5", "--log-every", "1", "--ckpt-every", "1000", *extra]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("volumes")
    for seed in (0, 1):
        image, label = synthetic_volume(size=(24, 24, 24), seed=seed, n_blobs=4)
        sitk.WriteImage(image, str(folder / f"v{seed}.nii.gz"))
        sitk.WriteImage(label, str(folder / f"v{seed}_label.nii.gz"))
    data = folder / "data"
    data.mkdir()
    for seed in (0, 1):
        shutil.copy(folder / f"v{seed}.nii.gz", data)
    return folder


@pytest.fixture(scope="module")
def pretrained_run(volumes, tmp_path_factory):
    """A finished 2-step pre-training run to copy and damage."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    assert gvsl_main([str(a) for a in pretrain_args(volumes / "data", out, 2)]) == 0
    return out


@pytest.fixture(scope="module")
def match_result(volumes, tiny_model):
    return match_pair(str(volumes / "v0.nii.gz"), str(volumes / "v1.nii.gz"), tiny_model, device="cpu")


def match_args(volumes, out, checkpoint, *extra):
    return ["match", volumes / "v0.nii.gz", volumes / "v1.nii.gz", "--out", out, "--checkpoint", checkpoint,
            "--device", "cpu", "--no-report", *extra]


# ------------------------------------------------------------- data loss


def test_second_pretrain_on_same_folder_is_refused_and_stale_lock_taken_over(volumes, pretrained_run, tmp_path,
                                                                            capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    # A live first run (another process, still running) owns the folder.
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from gvsl.safe_io import RunLock; "
                              "RunLock(sys.argv[1], 'gvsl pretrain').acquire(); print('locked', flush=True); "
                              "time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert owner.stdout.readline().strip() == "locked"
        before = digest(run)
        code, _, err = run_cli(capsys, *pretrain_args(volumes / "data", run, 4, "--resume"))
        assert code == 1
        assert f"in use by gvsl pretrain (pid {owner.pid} on host" in error_line(err)
        assert digest(run) == before  # the first run's weights, config and log are untouched
    finally:
        owner.kill()
        owner.wait()
    # Its process is gone (killed: no clean-up ran); the lock it left is taken over with a note.
    assert (run / LOCK_NAME).exists()
    code, _, err = run_cli(capsys, *pretrain_args(volumes / "data", run, 3, "--resume"))
    assert code == 0, err
    assert f"owner gvsl pretrain (pid {owner.pid}" in err and "is no longer running" in err
    assert read_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not (run / LOCK_NAME).exists()


def test_match_on_a_full_disk_is_an_error_and_keeps_the_previous_results(volumes, tiny_checkpoint, tmp_path,
                                                                        capsys):
    reference = tmp_path / "reference"
    assert run_cli(capsys, *match_args(volumes, reference, tiny_checkpoint))[0] == 0
    size = sum(p.stat().st_size for p in reference.iterdir())
    with tmpfs(tmp_path / "disk", size * 3) as disk:
        out = disk / "result"
        shutil.copytree(reference, out)  # an earlier run's results
        before = digest(out)
        fill(disk, size // 4)  # room for a quarter of a new result
        code, _, err = run_cli(capsys, *match_args(volumes, out, tiny_checkpoint))
        assert code == 1
        line = error_line(err)
        assert "disk is full" in line and ".nii.gz: " in line, line
        assert digest(out) == before  # nothing half-written under a final name, nothing lost
        assert not list(out.glob(TEMP_PREFIX + "*")) and not (out / LOCK_NAME).exists()


# ----------------------------------------------------------- wrong inputs


def test_truncated_nifti_is_refused_by_match_and_skipped_by_pretrain(volumes, tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(volumes / "data", data)
    whole = (volumes / "v1.nii.gz").read_bytes()
    (data / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    code, _, err = run_cli(capsys, "match", volumes / "v0.nii.gz", data / "cut.nii.gz", "--out", tmp_path / "m",
                           "--checkpoint", tiny_checkpoint, "--device", "cpu")
    assert code == 1 and "cut.nii.gz: truncated: the header declares" in error_line(err)
    assert not (tmp_path / "m").exists()
    skipped = []
    arrays, report = load_training_volumes(data, "auto", 1.5, tmp_path / "cache", log=skipped.append)
    assert len(arrays) == 2 and not any("cut" in used for used in report.used)
    assert any("cut.nii.gz: truncated" in s for s in skipped)


def test_values_beyond_float32_are_refused_before_anything_is_written(volumes, tiny_checkpoint, tmp_path, capsys):
    huge = np.full((24, 24, 24), 1e300)
    huge[8:16, 8:16, 8:16] = -1e300
    sitk.WriteImage(sitk.GetImageFromArray(huge), str(tmp_path / "huge.nrrd"))
    code, _, err = run_cli(capsys, "match", tmp_path / "huge.nrrd", volumes / "v1.nii.gz", "--out", tmp_path / "m",
                           "--checkpoint", tiny_checkpoint, "--device", "cpu", "--no-report")
    assert code == 1 and "beyond the float32 working type" in error_line(err)
    assert not (tmp_path / "m").exists()


def test_nan_weights_are_refused_and_a_nan_result_is_never_written(tiny_model, match_result, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["unet.inc.double_conv.0.weight"][0] = float("nan")
    path = save_atomic({"format": FORMAT, "format_version": 1, "kind": "pretrain", "model": tiny_model.config,
                        "state_dict": state, "step": 0}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan.pt: 1 weight tensors hold NaN or infinity"):
        gvsl.load_model(path)
    # Whatever produced it, a result with NaN is not saved, and strict JSON never sees NaN.
    out = tmp_path / "result"
    match_result.save(out, report=False)
    before = digest(out)
    jac = sitk.GetArrayFromImage(match_result.jacobian)
    jac[0, 0, 0] = np.nan
    broken = sitk.GetImageFromArray(jac)
    broken.CopyInformation(match_result.jacobian)
    original, match_result.jacobian = match_result.jacobian, broken
    try:
        with pytest.raises(NonFiniteError, match=r"jacobian.nii.gz: 1 voxels are NaN or infinite"):
            match_result.save(out, report=False)
    finally:
        match_result.jacobian = original
    assert digest(out) == before
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


@pytest.mark.parametrize("rows, message", [
    ("x,y,z\n1,2,3\n1e9,0,0\n", "row 3: LPS point [1000000000.0, 0.0, 0.0] mm lies outside the fixed image"),
    ("1,2,3\nnan,2,3\n", "row 2: coordinates [nan, 2.0, 3.0] are not all finite numbers"),
    ("1,2,3\n\n4,5\n", "row 3: needs 3 numbers x,y,z[,image], got 2"),
])
def test_bad_query_points_are_refused_before_any_computation(volumes, tmp_path, capsys, rows, message):
    points = tmp_path / "points.csv"
    points.write_text(rows)
    # A checkpoint that does not exist: had any computation started, that would be the error.
    code, _, err = run_cli(capsys, *match_args(volumes, tmp_path / "m", tmp_path / "missing.pt", "--points", points))
    assert code == 1 and f"points.csv {message}" in error_line(err)
    assert not (tmp_path / "m").exists()


def test_json_point_outside_the_moving_image_names_the_item(volumes, tmp_path, capsys):
    points = tmp_path / "points.json"
    points.write_text(json.dumps([{"point": [10, 10, 10]}, {"point": [10, 10, 500], "image": "moving"}]))
    code, _, err = run_cli(capsys, *match_args(volumes, tmp_path / "m", tmp_path / "missing.pt", "--points", points))
    assert code == 1 and "points.json item 2: LPS point [10.0, 10.0, 500.0] mm lies outside the moving" in err


@pytest.mark.parametrize("size", [2, 3])
def test_tiny_volumes_are_refused(tmp_path, size):
    path = tmp_path / f"tiny{size}.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(size ** 3, dtype=np.float32).reshape((size,) * 3)), str(path))
    with pytest.raises(InputError, match=rf"tiny{size}.nii.gz: is only {size} x {size} x {size} voxels; at least 4"):
        read_image(path)


def test_needle_thin_volume_is_refused_with_the_reason(volumes, tiny_checkpoint, tmp_path, capsys):
    image, _ = synthetic_volume(size=(64, 64, 8), spacing=(0.1, 0.1, 50.0), seed=0, n_blobs=3)
    sitk.WriteImage(image, str(tmp_path / "thin.nii.gz"))
    args = match_args(volumes, tmp_path / "m", tiny_checkpoint)
    args[1] = tmp_path / "thin.nii.gz"
    with pytest.warns(InputWarning, match=r"thin.nii.gz: voxels are 0.1 x 0.1 x 50 mm \(500:1\)"):
        code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert "thin.nii.gz: covers 6.4 x 6.4 x 400.0 mm, only 2.0 voxels across" in error_line(err)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ resume


def test_torn_last_metrics_line_is_dropped_on_resume(volumes, pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "ncc": 0.8')  # killed mid-line
    code, _, err = run_cli(capsys, *pretrain_args(volumes / "data", run, 3, "--resume"))
    assert code == 0, err
    assert "metrics.jsonl: dropped 1 incomplete line(s)" in err
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_without_a_run_is_refused(volumes, tmp_path, capsys):
    code, _, err = run_cli(capsys, *pretrain_args(volumes / "data", tmp_path / "none", 3, "--resume"))
    assert code == 1 and "--resume found no run to continue (no checkpoints/last.pt)" in error_line(err)
    assert not (tmp_path / "none").exists()


def test_resume_with_another_width_is_one_line_naming_the_option(volumes, pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    before = digest(run)
    args = pretrain_args(volumes / "data", run, 4, "--resume")
    args[args.index("--width") + 1] = "0.5"
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert "started with --width 0.25, this command asks for 0.5; resume with --width 0.25" in error_line(err)
    assert len(err) < 600, err
    assert digest(run) == before


def test_temporary_checkpoints_left_by_kills_are_removed(volumes, pretrained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    for k in range(7):
        (run / "checkpoints" / f"last.pt.{k}abc.tmp").write_bytes(b"\0" * 1000)
    code, _, err = run_cli(capsys, *pretrain_args(volumes / "data", run, 3, "--resume"))
    assert code == 0, err
    assert "removed 7 temporary file(s)" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


# ---------------------------------------------------------------- messages


def test_checkpoint_messages_name_the_problem(tiny_model, tmp_path):
    text = tmp_path / "readme.pt"
    text.write_text("These are my notes about the model.\nSecond line.\n")
    with pytest.raises(CheckpointError, match=r"readme.pt: not a PyTorch checkpoint \(a text file starting "
                                              r"'These are my notes"):
        gvsl.load_model(text)
    torch.save({"format": FORMAT, "format_version": 1, "kind": "pretrain", "model": tiny_model.config, "step": 0},
               tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match=r"nostate.pt: a GVSL checkpoint without its weights \('state_dict'"):
        gvsl.load_model(tmp_path / "nostate.pt")
    torch.save({"format": FORMAT, "format_version": 1, "kind": "pretrain", "model": {"width": 1000.0},
                "state_dict": tiny_model.state_dict(), "step": 0}, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"wide.pt: says width 1000.0, but its weights have width 0.25"):
        gvsl.load_model(tmp_path / "wide.pt")


def test_full_disk_during_pretrain_keeps_the_last_checkpoint(volumes, pretrained_run, tmp_path, capsys):
    checkpoint_bytes = (pretrained_run / "checkpoints" / "last.pt").stat().st_size
    with tmpfs(tmp_path / "disk", int(checkpoint_bytes * 1.6)) as disk:
        run = disk / "run"
        shutil.copytree(pretrained_run, run, ignore=shutil.ignore_patterns("cache"))
        before = (run / "checkpoints" / "last.pt").read_bytes()
        code, _, err = run_cli(capsys, *pretrain_args(volumes / "data", run, 3, "--resume", "--cache-dir",
                                                      tmp_path / "cache"))
        assert code == 1
        line = error_line(err)
        assert "last.pt: the checkpoint could not be written (the disk is full" in line, line
        assert "the previous last.pt is unchanged" in line and "enforce fail" not in err
        assert (run / "checkpoints" / "last.pt").read_bytes() == before
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


@contextmanager
def read_only_folder(tmp_path):
    if ROOT:  # permissions do not stop root: a read-only file system does
        with tmpfs(tmp_path / "ro", "1m") as folder:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            yield folder
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        try:
            yield folder
        finally:
            folder.chmod(0o700)


def test_read_only_output_folder_fails_before_the_work(volumes, tmp_path, capsys):
    with read_only_folder(tmp_path) as folder:
        # The checkpoints do not exist: the folder must be the first thing checked.
        code, _, err = run_cli(capsys, *match_args(volumes, folder / "m", tmp_path / "missing.pt"))
        assert code == 1 and f"{folder / 'm'}: cannot create the folder" in error_line(err)
        code, _, err = run_cli(capsys, "segment", volumes / "v0.nii.gz", "--checkpoint", tmp_path / "missing.pt",
                               "--out", folder / "seg.nii.gz", "--device", "cpu")
        assert code == 1 and f"{folder}: cannot write there" in error_line(err), err
        assert "missing.pt" not in err


# --------------------------------------------------------------- fine-tune


def finetune_case(volumes, tmp_path, edit_label):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for seed in (0, 1):
        shutil.copy(volumes / f"v{seed}.nii.gz", images / f"c{seed}.nii.gz")
        label = sitk.ReadImage(str(volumes / f"v{seed}_label.nii.gz"))
        sitk.WriteImage(edit_label(label, seed), str(labels / f"c{seed}.nii.gz"))
    return ["finetune", "--images", images, "--labels", labels, "--out", tmp_path / "run", "--patch", "16",
            "--iters", "2", "--width", "0.25", "--device", "cpu", "--spacing", "1.5"]


def test_a_stray_label_value_does_not_become_200_classes(volumes, tmp_path, capsys):
    def stray(label, seed):
        array = sitk.GetArrayFromImage(label)
        if seed == 1:
            array[0, 0, 0] = 200
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        return out
    code, _, err = run_cli(capsys, *finetune_case(volumes, tmp_path, stray))
    assert code == 1
    line = error_line(err)
    assert "are sparse: inferring the class count from the largest (200, in" in line and "c1.nii.gz" in line
    assert "pass --classes" in line
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_negative_int16_label_is_refused_not_cast_to_255(volumes, tmp_path, capsys):
    def negative(label, seed):
        array = sitk.GetArrayFromImage(label).astype(np.int16)
        array[0, 0, 0] = -1
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        return out
    code, _, err = run_cli(capsys, *finetune_case(volumes, tmp_path, negative))
    assert code == 1
    assert "c0.nii.gz: label map holds values [-1] outside 0..255 (1 voxels)" in error_line(err)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_diverged_weights_never_overwrite_the_last_checkpoint(pretrained_run, tmp_path):
    from gvsl.runtime import TrainingDivergedError, check_finite_losses, write_checkpoint
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run, ignore=shutil.ignore_patterns("cache"))
    before = (run / "checkpoints" / "last.pt").read_bytes()
    payload = read_checkpoint(run / "checkpoints" / "last.pt")
    payload["state_dict"]["unet.inc.double_conv.0.weight"].fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"step 3: 1 weight tensors are NaN or infinite"):
        write_checkpoint(run, payload, 3, periodic=True)
    with pytest.raises(TrainingDivergedError, match=r"step 3: the loss is not finite \(ncc\)"):
        check_finite_losses({"ncc": float("nan"), "mse": 0.1}, 3, run)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


def test_a_run_whose_every_step_is_skipped_stops_with_a_clear_error(tmp_path):
    """The mixed-precision scaler skips steps with non-finite gradients and halves its scale; a
    scale that collapsed means no step changed the weights for dozens of steps."""
    from gvsl.runtime import TrainingDivergedError, check_grad_scale
    check_grad_scale(65536.0, 10, tmp_path)
    check_grad_scale(0.5, 10, tmp_path)  # some skipped steps (overflows) are normal
    with pytest.raises(TrainingDivergedError, match=r"step 40: the gradients were not finite .* scale 0\)"):
        check_grad_scale(0.0, 40, tmp_path)
