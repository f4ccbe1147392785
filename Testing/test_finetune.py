"""Fine-tuning, linear probing and segmentation."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import json_events, run_gvsl, sigterm_after_progress
from gvsl.checkpoint import read_checkpoint
from gvsl.data import InputError
from gvsl.finetune import FinetuneConfig, run_finetune
from gvsl.metrics import dice_per_label
from gvsl.samples import synthetic_volume
from gvsl.segment import class_volumes_ml

CT_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def test_dice_on_hand_made_example():
    prediction = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    reference = np.array([[0, 1, 0, 2], [2, 0, 0, 3]])
    d = dice_per_label(prediction, reference, [1, 2, 3, 4])
    assert d[1] == pytest.approx(2 * 1 / (2 + 1))
    assert d[2] == pytest.approx(2 * 2 / (3 + 2))
    assert d[3] == 0.0
    assert np.isnan(d[4])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for seed in range(3):
        image, labels = synthetic_volume(size=(32, 32, 24), spacing=(1.2, 1.2, 1.6), direction=CT_DIRECTION,
                                         seed=10 + seed, n_blobs=6)
        sitk.WriteImage(image, str(root / "images" / f"case{seed}.nii.gz"))
        sitk.WriteImage(labels, str(root / "labels" / f"case{seed}.nii.gz"))
    return root


def config(labelled, out, **kw):
    base = dict(images=str(labelled / "images"), labels=str(labelled / "labels"), out=str(out), patch=[32, 32, 32],
                iters=20, batch=2, lr=3e-3, width=0.25, device="cpu", log_every=1, val_every=10, ckpt_every=1000,
                spacing=1.5, classes=["a", "b", "c"], val_fraction=0.34, init="scratch")
    base.update(kw)
    return FinetuneConfig(**base)


def test_full_finetune_lowers_loss_and_keeps_best(labelled, tmp_path):
    summary = run_finetune(config(labelled, tmp_path / "run", iters=30), progress="text")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert any("val_dice" in r for r in rows)
    best = read_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["classes"] == ["a", "b", "c"] and best["preprocessing"]["preset"] == "ct"
    assert summary["best_val_dice"] >= 0


def test_linear_mode_freezes_backbone_and_trains_head(labelled, tmp_path, tiny_checkpoint):
    import gvsl
    base = gvsl.load_model(tiny_checkpoint)
    run_finetune(config(labelled, tmp_path / "lin", mode="linear", init=str(tiny_checkpoint), iters=5, width=None),
                 progress="text")
    ckpt = read_checkpoint(tmp_path / "lin" / "checkpoints" / "last.pt")
    for key, value in base.unet.state_dict().items():
        assert torch.equal(ckpt["state_dict"]["backbone." + key], value), key
    torch.manual_seed(0)
    assert ckpt["mode"] == "linear"
    # the head moved away from where a fresh run with the same seed starts
    run_finetune(config(labelled, tmp_path / "lin0", mode="linear", init=str(tiny_checkpoint), iters=1, width=None,
                        lr=0.0), progress="text")
    start = read_checkpoint(tmp_path / "lin0" / "checkpoints" / "last.pt")["state_dict"]["head.weight"]
    assert not torch.allclose(ckpt["state_dict"]["head.weight"], start)


def test_mismatched_geometry_is_a_clear_error(labelled, tmp_path):
    images, labels = tmp_path / "i", tmp_path / "l"
    images.mkdir()
    labels.mkdir()
    for k in range(2):
        image, label = synthetic_volume(size=(20, 20, 16), seed=k)
        if k == 1:
            label.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(image, str(images / f"c{k}.nii.gz"))
        sitk.WriteImage(label, str(labels / f"c{k}.nii.gz"))
    with pytest.raises(InputError, match=r"c1.nii.gz and its label .*c1.nii.gz differ in geometry: spacing"):
        run_finetune(config(labelled, tmp_path / "run", images=str(images), labels=str(labels)), progress="text")


def test_labels_outside_declared_classes_are_reported(labelled, tmp_path):
    with pytest.raises(InputError, match=r"labels \[3\] are outside the declared classes 0..2"):
        run_finetune(config(labelled, tmp_path / "run", classes=["a", "b"]), progress="text")


def test_interrupted_finetune_resumes_and_segment_keeps_geometry(labelled, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--images", labelled / "images", "--labels", labelled / "labels", "--out", out,
            "--patch", "32", "--iters", "500", "--width", "0.25", "--device", "cpu", "--classes", "a,b,c",
            "--progress", "json", "--spacing", "1.5", "--log-every", "1", "--val-every", "2"]
    returncode, events, err = sigterm_after_progress(args, min_step=2)
    assert returncode == 0, err
    saved = read_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert saved == [e for e in events if e["event"] == "done"][0]["step"] >= 2
    resumed = run_gvsl(args[:10] + [saved + 2] + args[11:] + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    events = json_events(resumed.stdout)
    assert [e for e in events if e["event"] == "start"][0]["step"] == saved
    assert events[-1]["event"] == "done" and events[-1]["step"] == saved + 2

    image, _ = synthetic_volume(size=(30, 26, 14), spacing=(1.3, 1.1, 2.5), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1),
                                origin=(5.0, -7.0, 11.0), seed=99)
    sitk.WriteImage(image, str(tmp_path / "new.nrrd"))
    result = run_gvsl(["segment", tmp_path / "new.nrrd", "--checkpoint", out / "checkpoints" / "best.pt",
                       "--out", tmp_path / "seg.nii.gz", "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    seg = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert seg.GetSize() == image.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)
    assert "volume (mL)" in result.stdout and "a" in result.stdout


def test_class_volumes():
    labels = sitk.GetImageFromArray(np.array([[[0, 1, 1], [2, 0, 0]]], dtype=np.uint8))
    labels.SetSpacing((2.0, 2.0, 2.5))
    assert class_volumes_ml(labels, ["x", "y"]) == {"x": pytest.approx(0.02), "y": pytest.approx(0.01)}


def test_two_rank_gloo_finetune_with_validation_finishes_in_sync(labelled, tmp_path):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gvsl",
           "finetune", "--images", str(labelled / "images"), "--labels", str(labelled / "labels"),
           "--out", str(tmp_path / "ddp"), "--patch", "32", "--iters", "4", "--width", "0.25", "--device", "cpu",
           "--classes", "a,b,c", "--progress", "json", "--spacing", "1.5", "--val-every", "2", "--log-every", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    done = [e for e in json_events(result.stdout) if e["event"] == "done"]
    assert len(done) == 1 and len(set(done[0]["rank_parameter_checksums"])) == 1
    assert (tmp_path / "ddp" / "checkpoints" / "best.pt").exists()
