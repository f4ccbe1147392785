"""Issue 17: the probe's findings, one test each: the input that used to fail silently, lose
work or print an internal error, and the one-line message (or the right result) now."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl.cli import main as gvsl_main
from gvsl.data import InputError
from gvsl.safe_io import LOCK_NAME, TEMP_PREFIX
from gvsl.samples import synthetic_volume


def run_cli(capsys, *args):
    code = gvsl_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("volumes2")
    for seed in (0, 1):
        image, label = synthetic_volume(size=(24, 24, 24), seed=seed, n_blobs=4)
        sitk.WriteImage(image, str(folder / f"v{seed}.nii.gz"))
        sitk.WriteImage(label, str(folder / f"v{seed}_label.nii.gz"))
    return folder


def match_args(volumes, out, checkpoint, *extra):
    return ["match", volumes / "v0.nii.gz", volumes / "v1.nii.gz", "--out", out, "--checkpoint", checkpoint,
            "--device", "cpu", "--no-report", *extra]


# ------------------------------------------------------------- 14: options


@pytest.mark.parametrize("command, option, value, message", [
    ("match", "--spacing", "-2", "wants a number > 0"),
    ("match", "--spacing", "0", "wants a number > 0"),
    ("match", "--spacing", "nan", "wants a finite number"),
    ("match", "--max-size", "0", "wants a whole number >= 1"),
    ("match", "--time-budget", "-1", "wants a number > 0"),
    ("match", "--time-budget", "nan", "wants a finite number"),
    ("pretrain", "--iters", "-3", "wants a whole number >= 1"),
    ("pretrain", "--ckpt-every", "0", "wants a whole number >= 1"),
    ("pretrain", "--log-every", "0", "wants a whole number >= 1"),
    ("pretrain", "--batch", "0", "wants a whole number >= 1"),
    ("finetune", "--val-every", "0", "wants a whole number >= 1"),
    ("finetune", "--val-fraction", "1.0", "wants a fraction in [0, 1)"),
    ("segment", "--window-batch", "0", "wants a whole number >= 1"),
])
def test_bad_option_values_are_refused_by_the_parser(tmp_path, capsys, command, option, value, message):
    base = {"match": ["match", "a.nii", "b.nii", "--out", tmp_path / "m"],
            "pretrain": ["pretrain", "--data", tmp_path, "--out", tmp_path / "p"],
            "finetune": ["finetune", "--images", tmp_path, "--labels", tmp_path, "--out", tmp_path / "f"],
            "segment": ["segment", "a.nii", "--checkpoint", "c.pt", "--out", tmp_path / "s.nii.gz"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        gvsl_main([str(a) for a in base + [option, value]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}, got '{value}'" in err, err
    assert not any(tmp_path.iterdir())
