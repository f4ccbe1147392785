"""Precision and memory format: the choice per device, bf16 against fp32, channels-last,
training in bf16, and the segmentation sliding window's progress events."""
import dataclasses
import json

import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

import gvsl
from gvsl.checkpoint import FORMAT, FORMAT_VERSION, read_checkpoint, save_atomic
from gvsl.match import default_checkpoint
from gvsl.network import SegmentationNet, use_channels_last
from gvsl.runtime import cpu_has_native_bf16, resolve_precision
from gvsl.samples import deformed_copy, random_deformation, synthetic_volume

# bf16 against fp32 on the shipped model (correlation matching since issue 15), a 48^3 pair;
# the model's field reaches 9.5 voxels there. Measured: mean field difference 0.015 voxel, 99.9th
# percentile 0.09, largest 0.30 (0.14 before the local soft-argmax, whose mean-shift steps sharpen
# the weights where two offsets nearly tie); feature cosine >= 0.9998. The soft-argmax over feature
# similarities turns the features' tiny bf16 differences into ~1 % of the displacement.
FIELD_TOLERANCE_MAX_VOXELS = 0.5
FIELD_TOLERANCE_P999_VOXELS = 0.15
FIELD_TOLERANCE_MEAN_VOXELS = 0.03
FEATURE_COSINE_MIN = 0.995
FEATURE_COSINE_MEAN = 0.999


def plain_fp32(device="cpu"):
    """Today's path before --precision: fp32, plain (NCDHW) layout."""
    return dataclasses.replace(resolve_precision(device, "fp32"), channels_last=False)


def test_auto_precision_on_this_cpu_follows_its_bf16_units():
    auto = resolve_precision("cpu", "auto")
    assert auto.name == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert auto.autocast_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert auto.channels_last
    fp16 = resolve_precision("cpu", "fp16")
    assert fp16.autocast_dtype == torch.float16 and fp16.needs_grad_scaler and fp16.grad_scaler().is_enabled()
    assert resolve_precision("cpu", "fp32").autocast_dtype is None
    assert resolve_precision("mps", "auto").name == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("cpu", "int8")


@pytest.fixture(scope="module")
def pair():
    image, _ = synthetic_volume(size=(48, 48, 48), seed=3)
    moving, _ = deformed_copy(image, None, random_deformation(image, seed=1))
    a = torch.from_numpy(sitk.GetArrayFromImage(image)).float()
    b = torch.from_numpy(sitk.GetArrayFromImage(moving)).float()
    lo, hi = a.min(), a.max()
    return ((a - lo) / (hi - lo))[None, None], ((b - lo) / (hi - lo)).clamp(0, 1)[None, None]


def run_model(precision, a, b):
    model = precision.prepare(gvsl.load_model(default_checkpoint()).eval())
    with precision.inference():
        return model(a, b, restore=False)


def test_channels_last_changes_layout_not_results(pair):
    a, b = pair
    plain = run_model(plain_fp32(), a, b)
    channels_last = run_model(resolve_precision("cpu", "fp32"), a, b)
    assert channels_last.features_a.is_contiguous(memory_format=torch.channels_last_3d)
    # Same arithmetic in another summation order: float32 rounding differences only.
    assert torch.allclose(plain.flow, channels_last.flow, atol=1e-3)
    cosine = F.cosine_similarity(plain.features_a, channels_last.features_a, dim=1)
    assert cosine.min() > 0.99999
    model = use_channels_last(gvsl.GVSL(width=0.25))
    reference = gvsl.GVSL(width=0.25)
    assert list(model.state_dict()) == list(reference.state_dict())  # same names: checkpoints still load
    reference.load_state_dict(model.state_dict())


def test_bf16_agrees_with_fp32_within_stated_tolerance(pair):
    a, b = pair
    fp32 = run_model(plain_fp32(), a, b)
    bf16 = run_model(resolve_precision("cpu", "bf16"), a, b)
    # Fields, affine and the warped image stay fp32 whatever the convolutions ran in.
    for name in ("flow", "local_flow", "affine", "affine_flow", "warped"):
        assert getattr(bf16, name).dtype == torch.float32, name
    assert fp32.flow.abs().max() > 1.0  # a real deformation, not a near-zero field
    difference = (fp32.flow - bf16.flow).abs()
    assert difference.max() < FIELD_TOLERANCE_MAX_VOXELS, float(difference.max())
    assert difference.flatten().quantile(0.999) < FIELD_TOLERANCE_P999_VOXELS
    assert difference.mean() < FIELD_TOLERANCE_MEAN_VOXELS, float(difference.mean())
    for key in ("features_a", "features_b"):
        cosine = F.cosine_similarity(getattr(fp32, key).float(), getattr(bf16, key).float(), dim=1)
        assert cosine.min() > FEATURE_COSINE_MIN and cosine.mean() > FEATURE_COSINE_MEAN, (key, float(cosine.min()))


def test_bf16_pretraining_lowers_the_loss_and_keeps_fp32_weights_and_optimizer(pair_folder, tmp_path):
    from gvsl.pretrain import PretrainConfig, run_pretrain
    cfg = PretrainConfig(data=str(pair_folder), out=str(tmp_path / "run"), patch=[32, 32, 32], iters=40,
                         batch=2, lr=5e-4, width=0.25, device="cpu", log_every=1, ckpt_every=1000,
                         augment=False, seed=0, precision="bf16")
    run_pretrain(cfg, progress="text")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    # Against the loss before any update: at 2e-3 the first steps spiked (0.18 -> 0.64) or not, run to
    # run, so a mean over the first steps made this check flaky; at 5e-4 the loss falls steadily below it.
    first = rows[0]["ncc"]
    last = sum(r["ncc"] for r in rows[-5:]) / 5
    assert last < first - 0.02, (first, last)
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}
    moments = [t for state in ckpt["optimizer"]["state"].values() for k, t in state.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    # Saved from a channels-last model, loaded into a plain one: the same weights.
    plain = gvsl.GVSL(width=0.25)
    plain.load_state_dict(ckpt["state_dict"])


@pytest.fixture(scope="module")
def segmentation_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = SegmentationNet(2, width=0.25)
    path = tmp_path_factory.mktemp("seg") / "best.pt"
    save_atomic({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "finetune", "model": model.config,
                 "state_dict": model.state_dict(), "classes": ["a", "b"], "step": 0,
                 "preprocessing": {"preset": "ct", "spacing": 2.0, "patch": [16, 16, 16]}}, path)
    image, _ = synthetic_volume(size=(40, 36, 32), spacing=(1.0, 1.0, 1.0), seed=0)
    image_path = path.parent / "image.nii.gz"
    sitk.WriteImage(image, str(image_path))
    return path, image_path


def test_segment_reports_progress_per_window_batch_and_warns_when_long(segmentation_checkpoint, tmp_path,
                                                                        capsys, monkeypatch):
    import gvsl.segment as segment
    from gvsl.cli import build_parser
    from gvsl.finetune import sliding_window_count, window_roi
    checkpoint, image = segmentation_checkpoint
    monkeypatch.setattr(segment, "LONG_SEGMENTATION_S", 0.0)  # every run counts as long here
    args = build_parser().parse_args(["segment", str(image), "--checkpoint", str(checkpoint), "--out",
                                      str(tmp_path / "seg.nii.gz"), "--progress", "json", "--window-batch", "3"])
    segment.segment_cli(args)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    # 2 mm working grid of the 40 x 36 x 32 mm image: 20 x 18 x 16 voxels (D, H, W = 32, 36, 40 mm).
    total = sliding_window_count((16, 18, 20), window_roi([16, 16, 16], (16, 18, 20)), 0.5)
    assert total > 3
    assert [e["step"] for e in progress] == sorted({min(k, total) for k in range(3, total + 3, 3)})
    assert all(e["total"] == total and e["unit"] == "windows" for e in progress)
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["windows"] == total and "minutes" in warnings[0]["message"]
    assert events[0]["event"] == "start" and events[0]["precision"]["precision"] in ("fp32", "bf16")
    assert events[-1]["event"] == "done"
    labels = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert labels.GetSize() == sitk.ReadImage(str(image)).GetSize()
