"""Issue 16 item 13: ``gvsl match`` and ``gvsl segment`` honour the panel's stop file.
Match keeps what refinement reached (as ``--time-budget`` does); segment writes nothing.
Both exit 0 with a ``done`` event that says ``stopped``."""
import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import gvsl
from gvsl import stopfile
from gvsl.checkpoint import FORMAT, FORMAT_VERSION, save_atomic
from gvsl.match import MatchStopped, match_pair
from gvsl.samples import synthetic_volume


@pytest.fixture(scope="module")
def pair():
    fixed, _ = synthetic_volume(size=(36, 36, 24), spacing=(1.5, 1.5, 2.0), seed=4)
    moving, _ = synthetic_volume(size=(36, 36, 24), spacing=(1.5, 1.5, 2.0), seed=5)
    return fixed, moving


class StopAfter:
    """A stop callable that answers True from its ``n``-th call on."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self):
        self.calls += 1
        return self.calls >= self.n


def test_stop_during_refinement_keeps_what_it_reached(pair, tiny_model):
    fixed, moving = pair
    full = match_pair(fixed, moving, tiny_model, device="cpu", refine_iters=10)
    stop = StopAfter(4)
    stopped = match_pair(fixed, moving, tiny_model, device="cpu", refine_iters=10, stop=stop)
    refinement = stopped.metrics["refinement"]
    assert refinement["stopped_by_request"] is True and refinement["stopped_by_time_budget"] is False
    assert 0 < refinement["iterations"] < full.metrics["refinement"]["iterations"]
    assert full.metrics["refinement"]["stopped_by_request"] is False
    # a complete, usable result: fields, warped volume and metrics
    assert stopped.warped.GetSize() == fixed.GetSize()
    assert np.isfinite(sitk.GetArrayViewFromImage(stopped.displacement)).all()


def test_stop_before_the_network_raises_match_stopped(pair, tiny_model):
    with pytest.raises(MatchStopped):
        match_pair(*pair, tiny_model, device="cpu", stop=lambda: True)


def match_args(tmp_path, checkpoint, **kw):
    fixed, moving = tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"
    return argparse.Namespace(fixed=str(fixed), moving=str(moving), out=str(tmp_path / "out"), device="cpu",
                              preset="auto", checkpoint=str(checkpoint), spacing=None, max_size=None,
                              refine_iters=kw.get("refine_iters", 10), similarity="lncc", time_budget=None,
                              precision="auto", points=None, no_report=True, save_state=True, progress="json")


def events(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_match_cli_stopped_during_refinement_saves_the_partial_result(pair, tiny_checkpoint, tmp_path,
                                                                      monkeypatch, capsys):
    from gvsl import match as match_module
    sitk.WriteImage(pair[0], str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(pair[1], str(tmp_path / "moving.nrrd"))
    stop_path = tmp_path / "STOP"
    monkeypatch.setenv(stopfile.STOP_FILE_ENV, str(stop_path))
    from gvsl import refine
    original = refine.optimise_affine

    def optimise_then_request_stop(*args, **kwargs):  # the user clicks Stop during refinement
        out = original(*args, **kwargs)
        stopfile.request_stop(stop_path)
        return out

    monkeypatch.setattr(refine, "optimise_affine", optimise_then_request_stop)
    match_module.match_cli(match_args(tmp_path, tiny_checkpoint))
    done = [e for e in events(capsys.readouterr().out) if e["event"] == "done"][-1]
    assert done["stopped"] is True
    assert done["metrics"]["refinement"]["stopped_by_request"] is True
    out = tmp_path / "out"
    from gvsl.match import PANEL_IMAGE_FILES, RESIDUAL_FILE
    for name in ("affine.tfm", "warped.nii.gz", "jacobian.nii.gz", "metrics.json", "state.npz", RESIDUAL_FILE,
                 *PANEL_IMAGE_FILES.values()):  # --save-state: what the panel reads (issue 16 item 5)
        assert (out / name).is_file(), name
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nrrd"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"))))


def test_match_cli_stopped_before_the_network_exits_cleanly(pair, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from gvsl.match import match_cli
    sitk.WriteImage(pair[0], str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(pair[1], str(tmp_path / "moving.nrrd"))
    monkeypatch.setenv(stopfile.STOP_FILE_ENV, str(stopfile.request_stop(tmp_path / "STOP")))
    match_cli(match_args(tmp_path, tiny_checkpoint))  # returns: no exception, exit status 0
    evs = events(capsys.readouterr().out)
    assert evs[-1]["event"] == "done" and evs[-1]["stopped"] is True and evs[-1]["files"] == {}
    assert not any(e["event"] == "error" for e in evs)
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.fixture(scope="module")
def segmentation_checkpoint(tmp_path_factory):
    from gvsl.network import SegmentationNet
    torch.manual_seed(0)
    model = SegmentationNet(2, width=0.25)
    path = tmp_path_factory.mktemp("seg") / "best.pt"
    save_atomic({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "finetune",
                 "model": {"num_classes": 2, "width": 0.25}, "state_dict": model.state_dict(), "step": 1,
                 "classes": ["a", "b"], "preprocessing": {"preset": "ct", "spacing": 1.5, "patch": [16, 16, 16]}},
                path)
    return path


def segment_args(image, checkpoint, out):
    return argparse.Namespace(image=str(image), checkpoint=str(checkpoint), out=str(out), device="cpu",
                              overlap=0.5, window_batch=1, precision="auto", progress="json")


def test_segment_cli_stops_between_window_batches_and_writes_nothing(pair, segmentation_checkpoint, tmp_path,
                                                                    monkeypatch, capsys):
    from gvsl import segment
    image = tmp_path / "image.nrrd"
    sitk.WriteImage(pair[0], str(image))
    stop_path = tmp_path / "STOP"
    monkeypatch.setenv(stopfile.STOP_FILE_ENV, str(stop_path))
    original = segment.WindowProgress.__call__

    def first_batch_then_stop(self, done, total):  # the user clicks Stop after the first window
        stopfile.request_stop(stop_path)
        return original(self, done, total)

    monkeypatch.setattr(segment.WindowProgress, "__call__", first_batch_then_stop)
    segment.segment_cli(segment_args(image, segmentation_checkpoint, tmp_path / "labels.nrrd"))
    evs = events(capsys.readouterr().out)
    progress = [e for e in evs if e["event"] == "progress"]
    assert len(progress) == 1 and progress[0]["step"] < progress[0]["total"]
    assert evs[-1]["event"] == "done" and evs[-1]["stopped"] is True
    assert not (tmp_path / "labels.nrrd").exists() and not (tmp_path / "labels_classes.txt").exists()


def test_segment_cli_without_a_stop_request_writes_the_labels(pair, segmentation_checkpoint, tmp_path, monkeypatch,
                                                             capsys):
    from gvsl import segment
    image = tmp_path / "image.nrrd"
    sitk.WriteImage(pair[0], str(image))
    monkeypatch.setenv(stopfile.STOP_FILE_ENV, str(tmp_path / "STOP"))  # never created
    segment.segment_cli(segment_args(image, segmentation_checkpoint, tmp_path / "labels.nrrd"))
    evs = events(capsys.readouterr().out)
    assert evs[-1]["event"] == "done" and "stopped" not in evs[-1]
    assert sitk.ReadImage(str(tmp_path / "labels.nrrd")).GetSize() == pair[0].GetSize()


def test_segment_help_describes_image_device_and_overlap():
    from conftest import run_gvsl
    out = run_gvsl(["segment", "--help"], timeout=120)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "the volume to segment" in text and "auto | cpu | cuda | mps" in text
    assert "neighbouring sliding windows overlap" in text
