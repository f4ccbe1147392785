"""Known-transform training pairs (gvsl.synth) and the field loss they feed."""
import math

import numpy as np
import pytest
import torch

from gvsl.conventions import affine_to_flow, warp
from gvsl.data import PairSampler
from gvsl.losses import DescriptorContrastLoss, FieldLoss, GVSLLoss, LossWeights
from gvsl.network import GVSLOutput
from gvsl.synth import (KnownPairConfig, KnownPairSource, random_known_flow, render, smooth_noise,
                        synthetic_label_map)

PATCH = (32, 32, 32)


def _source(**config):
    rng = np.random.default_rng(0)
    arrays = [rng.random((30, 36, 28)).astype(np.float32) for _ in range(2)]
    return KnownPairSource(PairSampler(arrays, PATCH, seed=0), PATCH, KnownPairConfig(**config),
                           torch.Generator().manual_seed(0))


def test_fixed_volume_is_the_moving_one_under_the_known_flow():
    source = _source(independent_contrast=0.0)
    for _ in range(3):
        pair = source.sample(2)
        assert pair["a"].shape == (2, 1, *PATCH) and pair["flow"].shape == (2, 3, *PATCH)
        assert bool(pair["same_contrast"].all())
        assert torch.allclose(warp(pair["b"], pair["flow"]), pair["a"], atol=1e-5)
        assert 0.0 <= float(pair["b"].min()) and float(pair["b"].max()) <= 1.0 + 1e-6


def test_independent_contrast_is_flagged_and_differs():
    source = _source(independent_contrast=1.0, synthetic_fraction=1.0)
    pair = source.sample(1)
    assert not bool(pair["same_contrast"][0])
    assert not torch.allclose(warp(pair["b"], pair["flow"]), pair["a"], atol=1e-3)


def test_known_flow_stays_in_its_ranges():
    config = KnownPairConfig(elastic_voxels=0.0, shear=0.0, scale=0.0, rotation_deg=0.0, translation_voxels=3.0)
    flow, affine_flow, affine = random_known_flow(8, PATCH, config, torch.Generator().manual_seed(1))
    # A pure translation: the same vector everywhere, within +-3 voxels, equal to its affine part.
    assert torch.allclose(flow, affine_flow, atol=1e-5)
    assert float(flow.abs().max()) <= 3.0 + 1e-5
    assert torch.allclose(flow.flatten(2).std(dim=2), torch.zeros(8, 3), atol=1e-4)
    config = KnownPairConfig(elastic_voxels=0.0, shear=0.0, scale=0.0, translation_voxels=0.0, rotation_deg=10.0)
    flow, _, affine = random_known_flow(8, PATCH, config, torch.Generator().manual_seed(2))
    corner = math.sqrt(3) * (PATCH[0] - 1) / 2  # farthest voxel from the centre
    assert float(flow.norm(dim=1).max()) <= 2 * math.sin(math.radians(10) * math.sqrt(3) / 2) * corner + 1e-3
    assert torch.allclose(torch.linalg.det(affine[:, :, :3]), torch.ones(8), atol=1e-5)  # rotations


def test_aligned_fraction_draws_near_identity_transforms_and_is_off_by_default():
    generator = lambda: torch.Generator().manual_seed(4)
    usual = random_known_flow(64, PATCH, KnownPairConfig(), generator())[0]
    assert torch.equal(usual, random_known_flow(64, PATCH, KnownPairConfig(aligned_fraction=0.0), generator())[0])
    aligned = random_known_flow(64, PATCH, KnownPairConfig(aligned_fraction=1.0), generator())[0]
    usual_size, aligned_size = (f.norm(dim=1).flatten(1).mean(1) for f in (usual, aligned))
    # u^2 with u uniform: a third of the usual motion on average, and a quarter of the pairs
    # under a quarter of it (u < 0.5), which the usual ranges almost never draw.
    assert float(aligned_size.mean()) < 0.5 * float(usual_size.mean())
    assert int((aligned_size < 0.25 * usual_size.median()).sum()) >= 8
    assert int((usual_size < 0.25 * usual_size.median()).sum()) <= 2


def test_elastic_part_has_the_configured_size_and_no_folds():
    config = KnownPairConfig(rotation_deg=0.0, scale=0.0, shear=0.0, translation_voxels=0.0, elastic_voxels=1.5)
    flow, affine_flow, _ = random_known_flow(16, PATCH, config, torch.Generator().manual_seed(3))
    assert torch.allclose(affine_flow, torch.zeros_like(affine_flow), atol=1e-5)
    std = flow.flatten(1).std(dim=1)
    assert float(std.max()) <= 1.5 + 1e-4 and float(std.mean()) > 0.3  # amplitude uniform in [0, 1.5]
    jac = torch.stack(torch.gradient(flow, dim=(2, 3, 4)), dim=2)  # (N, 3, 3, D, H, W)
    det = torch.linalg.det(jac.permute(0, 3, 4, 5, 1, 2) + torch.eye(3))
    assert float((det <= 0).float().mean()) == 0.0


def test_coarse_subject_like_component_is_off_by_default_and_smooth_when_on():
    fine_only = KnownPairConfig(rotation_deg=0.0, scale=0.0, shear=0.0, translation_voxels=0.0, elastic_voxels=0.0)
    flow, _, _ = random_known_flow(4, PATCH, fine_only, torch.Generator().manual_seed(5))
    assert float(flow.abs().max()) < 1e-5  # the default adds nothing: the shipped recipe is unchanged
    coarse = KnownPairConfig(rotation_deg=0.0, scale=0.0, shear=0.0, translation_voxels=0.0, elastic_voxels=0.0,
                             coarse_elastic_voxels=3.0, coarse_fraction=1.0)
    flow, _, _ = random_known_flow(16, PATCH, coarse, torch.Generator().manual_seed(5))
    std = flow.flatten(1).std(dim=1)
    assert float(std.max()) <= 3.0 + 1e-4 and float(std.mean()) > 0.6  # amplitude uniform in [0, 3]
    # Coarser than the default elastic part: neighbouring voxels move nearly together.
    step = (flow[..., 1:] - flow[..., :-1]).abs().mean() / flow.abs().mean()
    assert float(step) < 0.1
    none_drawn = KnownPairConfig(rotation_deg=0.0, scale=0.0, shear=0.0, translation_voxels=0.0, elastic_voxels=0.0,
                                 coarse_elastic_voxels=3.0, coarse_fraction=0.0)
    flow, _, _ = random_known_flow(4, PATCH, none_drawn, torch.Generator().manual_seed(5))
    assert float(flow.abs().max()) < 1e-5


def test_stripped_pairs_keep_the_known_geometry_and_lose_the_outside():
    from gvsl.synth import strip_outer
    labels = synthetic_label_map(1, PATCH, KnownPairConfig(), torch.Generator().manual_seed(6))
    stripped = strip_outer(labels, torch.Generator().manual_seed(7))
    kept = stripped > 0
    assert bool((stripped[kept] == labels[kept]).all())  # inside: the same labels, same place
    assert 0.05 < float(kept.float().mean()) < float((labels > 0).float().mean())
    assert not bool(kept[..., 0, :, :].any()) and not bool(kept[..., -1].any())  # the patch's border is gone
    source = _source(strip_fraction=1.0, synthetic_fraction=1.0, independent_contrast=0.0)
    for _ in range(4):
        pair = source.sample(1)
        assert not bool(pair["same_contrast"][0])  # different content: no NCC between the two
        fixed_background = float((pair["a"] < 0.15).float().mean())
        moving_background = float((pair["b"] < 0.15).float().mean())
        assert fixed_background != moving_background


def test_synthetic_label_maps_and_rendering():
    config = KnownPairConfig(labels=(6, 10))
    labels = synthetic_label_map(3, PATCH, config, torch.Generator().manual_seed(4))
    assert labels.shape == (3, 1, *PATCH) and labels.dtype == torch.int64
    for i in range(3):
        present = torch.unique(labels[i]).numel()
        assert 4 <= present <= 11  # up to 10 labels and the background
    image = render(labels, torch.Generator().manual_seed(5))
    assert image.shape == labels.shape and float(image.min()) >= 0 and float(image.max()) <= 1
    # Each label gets one mean intensity: the image explains much more variance by label than not.
    lab, img = labels[0, 0].flatten(), image[0, 0].flatten()
    within = sum(float(img[lab == k].var(unbiased=False)) * int((lab == k).sum()) for k in torch.unique(lab)) / lab.numel()
    assert within < 0.5 * float(img.var(unbiased=False))


def test_smooth_noise_is_smooth():
    field = smooth_noise(1, 1, (48, 48, 48), 12.0, torch.Generator().manual_seed(6))
    step = field.diff(dim=2).abs().mean() / field.abs().mean()
    assert float(step) < 0.2


def _output(flow, affine_flow, warped, restored):
    return GVSLOutput(flow=flow, affine_flow=affine_flow, local_flow=flow - affine_flow, warped=warped,
                      restored=restored)


def test_field_loss_is_zero_at_the_truth_and_grows_with_the_error():
    source = _source(independent_contrast=0.0)
    truth = source.sample(1)
    exact = _output(truth["flow"], truth["affine_flow"], truth["a"], truth["a"])
    assert float(FieldLoss()(exact, truth)) == pytest.approx(0.0, abs=1e-8)
    off = _output(truth["flow"] + 1.0, truth["affine_flow"], truth["a"], truth["a"])
    assert float(FieldLoss()(off, truth)) == pytest.approx(3.0, rel=1e-4)  # 1 voxel on each of 3 axes


def test_gvsl_loss_adds_the_field_term_and_masks_ncc_across_contrasts():
    source = _source(independent_contrast=0.0)
    truth = source.sample(1)
    zero = torch.zeros_like(truth["flow"])
    output = _output(zero, zero, truth["b"], truth["a"])
    criterion = GVSLLoss()
    total, terms = criterion(output, truth["a"], truth)
    assert "field" in terms and float(terms["field"]) > 0
    assert float(total) == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-5)
    _, plain = criterion(output, truth["a"])
    assert "field" not in plain
    truth["same_contrast"] = torch.tensor([False])
    _, masked = criterion(output, truth["a"], truth)
    assert float(masked["ncc"]) == pytest.approx(1.0)  # no sample where NCC means anything: no signal


def _shifted_descriptors(shift_dhw, shape=(32, 32, 32), channels=32, seed=0):
    """Multi-level descriptors of A (random) and of B = A moved by an integer ``shift_dhw``:
    B's descriptor at p + shift is A's at p on the last level (levels: strides 16, 8, 4, 2, 1)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(1, channels, *shape, generator=g)
    moved = torch.roll(full, shifts=tuple(int(s) for s in shift_dhw), dims=(2, 3, 4))
    shift = torch.tensor(shift_dhw, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape)

    def levels(volume):
        return [torch.nn.functional.interpolate(volume, size=tuple(s // k for s in shape), mode="trilinear",
                                                align_corners=True) for k in (16, 8, 4, 2)]
    return GVSLOutput(features_a=full, features_b=moved, levels_a=levels(full), levels_b=levels(moved)), shift


def test_descriptor_contrast_loss_rewards_descriptors_that_match_at_the_known_correspondence():
    output, shift = _shifted_descriptors((2.0, -3.0, 1.0))
    a = torch.ones(1, 1, 32, 32, 32)
    last_level = DescriptorContrastLoss(points=64, level_weights=(0, 0, 0, 0, 1), seed=1)
    right = float(last_level(output, {"flow": shift}, a))
    wrong = float(last_level(output, {"flow": torch.zeros_like(shift)}, a))
    # Chance is log(64 queries x 9 candidates) = 6.4; exact matches among random descriptors score ~0.
    assert right < 0.2 and wrong > 2.0
    # The heatmap's weighting (coarse levels included) still ranks the true correspondence first.
    heatmap_weights = DescriptorContrastLoss(points=64, seed=1)
    assert float(heatmap_weights(output, {"flow": shift}, a)) < float(heatmap_weights(
        output, {"flow": torch.zeros_like(shift)}, a))
    # The gradient reaches the descriptors of both images, every weighted level.
    levels = [t.clone().requires_grad_(True) for t in output.levels_a + output.levels_b]
    features = output.features_a.clone().requires_grad_(True)
    output = GVSLOutput(features_a=features, features_b=output.features_b, levels_a=levels[:4], levels_b=levels[4:])
    heatmap_weights(output, {"flow": shift}, a).backward()
    assert features.grad.abs().sum() > 0 and levels[2].grad.abs().sum() > 0 and levels[6].grad.abs().sum() > 0
    assert levels[0].grad is None or float(levels[0].grad.abs().sum()) == 0.0  # the bottleneck weighs 0


def test_contrast_term_is_off_by_default_and_added_on_known_pairs_when_weighted():
    source = _source(independent_contrast=0.0)
    truth = source.sample(1)
    zero = torch.zeros_like(truth["flow"])
    output, _ = _shifted_descriptors((0.0, 0.0, 0.0), shape=tuple(truth["a"].shape[2:]))
    output.flow, output.affine_flow, output.local_flow = zero, zero, zero
    output.warped, output.restored = truth["b"], truth["a"]
    _, terms = GVSLLoss()(output, truth["a"], truth)
    assert "contrast" not in terms
    total, terms = GVSLLoss(LossWeights(contrast=2.0))(output, truth["a"], truth)
    assert float(terms["contrast"]) > 0
    assert float(total) == pytest.approx(sum(float(v) for k, v in terms.items() if k != "contrast")
                                         + 2.0 * float(terms["contrast"]), rel=1e-5)


def test_pretrain_on_known_pairs_logs_and_resumes(tmp_path):
    from gvsl.pretrain import PretrainConfig, run_pretrain
    import SimpleITK as sitk
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for k in range(2):
        image = sitk.GetImageFromArray((rng.random((24, 24, 24)) * 1000).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(data / f"v{k}.nii.gz"))
    cfg = PretrainConfig(data=str(data), out=str(tmp_path / "run"), patch=[16, 16, 16], iters=4, width=0.25,
                         spacing=2.0, log_every=1, ckpt_every=2, device="cpu", precision="fp32", known_pairs=1.0)
    summary = run_pretrain(cfg, progress="json")
    assert summary["step"] == 4 and "field" in summary["final_loss"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all('"field"' in line for line in lines)
    cfg.iters, cfg.resume = 6, True
    assert run_pretrain(cfg, progress="json")["step"] == 6


def test_pretrain_known_option_parses_a_known_pair_range_and_refuses_others():
    from gvsl.cli import build_parser
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--known", "coarse_elastic_voxels=3",
                                      "--known", "independent_contrast=0.5"])
    assert dict(args.known) == {"coarse_elastic_voxels": 3.0, "independent_contrast": 0.5}
    for bad in ("labels=4", "coarse_elastic_voxels", "nonsense=1", "elastic_voxels=-1"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--known", bad])
