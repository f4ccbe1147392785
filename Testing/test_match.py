"""Match pair in physical space: exported files agree with the engine and with ITK."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import gvsl
from gvsl.conventions import Grid, affine_to_flow, warp
from gvsl.match import jacobian_determinant, match_pair, read_points
from gvsl.samples import synthetic_volume

CT_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # as CTChest4


@pytest.fixture(scope="module")
def rigged_model():
    """A tiny network whose heads give a definite affine and a non-zero local field, so
    the export is checked on a non-trivial mapping."""
    torch.manual_seed(3)
    model = gvsl.GVSL(width=0.25).eval()
    with torch.no_grad():
        model.fc_rot.bias.copy_(torch.tensor([0.4, -0.3, 0.2]))
        model.fc_trans.bias.copy_(torch.tensor([0.05, -0.04, 0.03]))
        model.fc_scl.bias.copy_(torch.tensor([0.1, -0.1, 0.05]))
        model.out_flow.weight.normal_(0, 0.05)
        model.out_flow.bias.copy_(torch.tensor([0.8, -0.5, 0.3]))
    return model


@pytest.fixture(scope="module")
def known_pair():
    fixed, _ = synthetic_volume(size=(40, 44, 20), spacing=(1.6, 1.5, 3.2), direction=CT_DIRECTION,
                                origin=(30.0, 40.0, -60.0), seed=4)
    truth = sitk.Euler3DTransform()
    truth.SetCenter(Grid.of(fixed).physical_bounds_center().tolist())
    truth.SetRotation(0.1, -0.05, 0.15)
    truth.SetTranslation((4.0, -3.0, 5.0))
    moving = sitk.Resample(fixed, fixed, truth, sitk.sitkLinear, -1000.0)
    return fixed, moving, truth


@pytest.fixture(scope="module")
def matched(known_pair, rigged_model, tmp_path_factory):
    """The network's answer alone (``refine_iters=0``): exports must reproduce the engine."""
    fixed, moving, _ = known_pair
    out = tmp_path_factory.mktemp("match")
    result = match_pair(fixed, moving, rigged_model, device="cpu", preset="ct", spacing_mm=2.0, max_size=64,
                        refine_iters=0)
    centre = Grid.of(fixed).physical_bounds_center()
    files = result.save(out, points=[{"point": centre.tolist(), "image": "fixed"}])
    return result, files, out


def ncc_on(a, b, mask):
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_displacement_file_reproduces_warped_file(known_pair, matched):
    fixed, moving, _ = known_pair
    result, files, _ = matched
    field = sitk.ReadImage(files["displacement"])
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert Grid.of(field) == Grid.of(fixed) or np.allclose(field.GetDirection(), fixed.GetDirection())
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, -5000.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(files["warped"]))
    overlap = itk_warped > -4000  # voxels that map inside the moving image
    assert overlap.mean() > 0.5
    assert ncc_on(ours, itk_warped, overlap) > 0.99
    assert sitk.ReadImage(files["warped"]).GetSize() == fixed.GetSize()


def test_affine_file_reproduces_engine_affine_warp(matched):
    result, files, _ = matched
    tx = sitk.ReadTransform(files["affine"])
    moving_w = sitk.GetImageFromArray(result.moving_working)
    result.moving_grid.apply_to(moving_w)
    g = result.fixed_grid
    itk = sitk.GetArrayFromImage(sitk.Resample(moving_w, g.size, tx, sitk.sitkLinear, g.origin, g.spacing,
                                               g.direction, -1.0, sitk.sitkFloat32))
    affine = torch.from_numpy(result.voxel_affine)[None]
    engine = warp(torch.from_numpy(result.moving_working)[None, None].double(),
                  affine_to_flow(affine, g.shape), padding_mode="zeros")[0, 0].numpy()
    inside = itk > -0.5
    assert inside.mean() > 0.5
    assert ncc_on(engine, itk, inside) > 0.99


def test_points_map_like_the_engine_within_half_a_voxel(matched):
    result, files, _ = matched
    g_fix, g_mov = result.fixed_grid, result.moving_grid
    field = sitk.ReadImage(files["displacement"])
    dense = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    affine = sitk.ReadTransform(files["affine"])
    flow_local = result.local_displacement[0].numpy()
    from gvsl.conventions import voxel_affine_to_matrix
    v = voxel_affine_to_matrix(result.voxel_affine, g_fix.shape)
    rng = np.random.default_rng(0)
    half_voxel = 0.5 * min(g_fix.spacing)
    checked = 0
    for _ in range(40):
        p = np.array([rng.integers(4, s - 4) for s in g_fix.shape], dtype=float)
        x = (g_fix.voxel_to_physical() @ np.append(p, 1))[:3]
        index = np.asarray(result.fixed.TransformPhysicalPointToContinuousIndex(x.tolist()))
        if not np.all((index >= 0) & (index <= np.asarray(result.fixed.GetSize()) - 1)):
            continue  # the exported field covers the fixed image only
        q_affine = (v @ np.append(p, 1))[:3]
        q = q_affine + flow_local[(slice(None),) + tuple(int(i) for i in p)]
        engine = (g_mov.voxel_to_physical() @ np.append(q, 1))[:3]
        engine_affine = (g_mov.voxel_to_physical() @ np.append(q_affine, 1))[:3]
        assert np.linalg.norm(np.asarray(dense.TransformPoint(x.tolist())) - engine) < half_voxel
        assert np.linalg.norm(np.asarray(affine.TransformPoint(x.tolist())) - engine_affine) < 1e-3
        assert np.linalg.norm(result.map_points(x)[0] - engine) < 1e-3
        checked += 1
    assert checked >= 10


def test_metrics_and_files(matched, known_pair):
    result, files, out = matched
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in ("local_ncc_before", "local_ncc_after", "folding_fraction", "working_grid", "seconds", "device"):
        assert key in metrics
    assert set(metrics["seconds"]) >= {"load_resample", "network", "fields", "export"}
    points = json.loads((out / "points.json").read_text(encoding="utf-8"))
    assert (out / points[0]["heatmap"]).exists()
    assert (out / "report.png").stat().st_size > 10000


def linear_field(reference, matrix):
    grid = Grid.of(reference)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    pts = idx @ grid.voxel_to_physical()[:3, :3].T + grid.voxel_to_physical()[:3, 3]
    field = sitk.GetImageFromArray((pts @ matrix.T).reshape(*grid.shape, 3), isVector=True)
    field.CopyInformation(reference)
    return field


def test_jacobian_of_analytic_field_on_oblique_grid():
    reference = sitk.Image((20, 22, 24), sitk.sitkUInt8)
    reference.SetSpacing((1.5, 1.0, 3.0))
    reference.SetDirection(CT_DIRECTION)
    b = np.array([[0.1, 0.05, 0.0], [0.0, -0.2, 0.03], [0.02, 0.0, 0.3]])
    jac = sitk.GetArrayFromImage(jacobian_determinant(linear_field(reference, b)))
    np.testing.assert_allclose(jac, np.linalg.det(np.eye(3) + b), rtol=1e-4)


def test_folding_field_is_reported(known_pair):
    fixed, moving, _ = known_pair
    folding = np.diag([-1.6, 0.0, 0.0])  # x -> -0.6 x: orientation reversed
    jac = sitk.GetArrayFromImage(jacobian_determinant(linear_field(fixed, folding)))
    assert (jac <= 0).mean() > 0.99


def test_heatmap_of_a_point_against_its_own_image_peaks_there(rigged_model, known_pair):
    # A textured volume: every neighbourhood differs, so the peak is unique.
    reference = known_pair[0]
    rng = np.random.default_rng(5)
    texture = sitk.GetImageFromArray(rng.normal(0, 400, sitk.GetArrayViewFromImage(reference).shape).astype(np.float32))
    texture = sitk.SmoothingRecursiveGaussian(texture, 1.0)
    texture.CopyInformation(reference)
    fixed = texture
    result = match_pair(fixed, known_pair[1], rigged_model, device="cpu", preset="ct", spacing_mm=2.0, max_size=64,
                        refine_iters=0)
    voxel = np.array([15, 20, 24])  # a working-grid voxel (d, h, w)
    point = (result.fixed_grid.voxel_to_physical() @ np.append(voxel, 1.0))[:3]
    heat, best, score = result.heatmap(point, source="fixed", target="fixed")
    assert heat.GetSize() == fixed.GetSize()
    assert np.allclose(heat.GetOrigin(), fixed.GetOrigin()) and np.allclose(heat.GetDirection(), fixed.GetDirection())
    assert np.allclose(heat.GetSpacing(), fixed.GetSpacing())
    # ~1: coarse descriptor levels are normalised on the stride-2 grid (gvsl.descriptors).
    assert score == pytest.approx(1.0, abs=0.02)
    assert np.linalg.norm(best - point) <= np.sqrt(3) * result.fixed_grid.spacing[0] / 2 + 1e-6
    other, best_other, _ = result.heatmap(point, source="fixed")
    assert other.GetSize() == known_pair[1].GetSize()


def test_points_file_formats(tmp_path):
    (tmp_path / "p.csv").write_text("x,y,z,image\n1,2,3,fixed\n4,5,6,moving\n", encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps([{"point": [1, 2, 3], "space": "RAS"}, [7, 8, 9]]), encoding="utf-8")
    assert read_points(tmp_path / "p.csv") == [{"point": [1.0, 2.0, 3.0], "image": "fixed"},
                                              {"point": [4.0, 5.0, 6.0], "image": "moving"}]
    assert read_points(tmp_path / "p.json")[0]["point"] == [-1.0, -2.0, 3.0]


def test_demo_runs_end_to_end(tmp_path):
    """The shipped CT against a known affine + B-spline deformation of itself: the refined
    match must land within 3 mm on average (CTChest4's voxels are 3 x 3 x 10 mm) and beat
    the network alone."""
    from gvsl.demo import run_demo
    summary = run_demo(out=tmp_path / "demo", device="cpu", quiet=True)
    assert (tmp_path / "demo" / "report.png").exists()
    assert (tmp_path / "demo" / "network_displacement.nii.gz").exists()
    error, dice = summary["landmark_error_mm"], summary["mean_dice"]
    assert error["before"]["mean"] > 5
    for key in ("before", "network", "after"):
        assert 0 <= dice[key] <= 1
    assert error["after"]["mean"] < 3.0
    assert error["after"]["mean"] < error["network"]["mean"] < error["before"]["mean"]
    assert dice["after"] > 0.9 and dice["after"] > dice["network"] > dice["before"]
    assert summary["local_ncc"]["after"] > summary["local_ncc"]["network"]
    assert summary["folding_fraction"] < 0.005


def test_working_grid_defaults_to_the_models_training_grid(known_pair, rigged_model):
    fixed, moving, _ = known_pair
    rigged_model.checkpoint_meta = {"preprocessing": {"spacing": 3.0}, "config": {"patch": [32, 32, 32]}}
    try:
        result = match_pair(fixed, moving, rigged_model, device="cpu", preset="ct", refine_iters=0)
    finally:
        del rigged_model.checkpoint_meta
    grid = result.metrics["working_grid"]
    assert max(grid["shape_dhw"]) <= 32 and grid["spacing_mm"] >= 3.0


# ----------------------------------------------------------------- refinement


@pytest.fixture(scope="module")
def refined(known_pair, rigged_model, tmp_path_factory):
    """The rigged network starts far off (its affine is deliberately wrong); refinement must
    recover the known rigid transform from the pair itself."""
    fixed, moving, _ = known_pair
    out = tmp_path_factory.mktemp("refined")
    result = match_pair(fixed, moving, rigged_model, device="cpu", preset="ct", spacing_mm=2.0, max_size=64,
                        refine_iters=40)
    return result, result.save(out, report=False), out


def _interior_points(image, count, seed, margin=4):
    rng = np.random.default_rng(seed)
    size = np.asarray(image.GetSize())
    index = rng.uniform(margin, size - 1 - margin, (count, 3))
    return np.array([image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])


def test_refinement_recovers_a_known_transform(refined, known_pair):
    result, _, _ = refined
    fixed, _, truth = known_pair
    points = _interior_points(fixed, 200, 1, margin=6)
    # moving(x) = fixed(truth(x)), so a fixed point p sits at truth^-1(p) in the moving image.
    true_moving = np.array([truth.GetInverse().TransformPoint(p.tolist()) for p in points])
    error = np.linalg.norm(result.map_points(points) - true_moving, axis=1)
    network_error = np.linalg.norm(result.map_points(points, network=True) - true_moving, axis=1)
    assert np.median(error) < 1.5  # voxels are 1.5 x 1.6 x 3.2 mm
    assert error.mean() < network_error.mean() / 3
    m = result.metrics
    assert m["local_ncc_stages"]["refined"] > m["local_ncc_stages"]["network"]
    assert m["refinement"]["iterations"] > 0 and m["refinement"]["warning"] is None
    assert m["folding_fraction"] < 0.005


def test_refined_files_are_one_mapping(refined):
    """displacement.nii.gz resamples the moving image onto warped.nii.gz (SimpleITK), the
    points map like the engine, and the Jacobian file matches the field's own."""
    result, files, out = refined
    fixed, moving = result.fixed, result.moving
    field = sitk.ReadImage(files["displacement"])
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, -5000.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(files["warped"]))
    overlap = itk_warped > -4000
    assert overlap.mean() > 0.5
    assert ncc_on(ours, itk_warped, overlap) > 0.99
    for x in _interior_points(fixed, 30, 2):
        assert np.linalg.norm(np.asarray(tx.TransformPoint(x.tolist())) - result.map_points(x)[0]) < 0.05
    ours_jac = sitk.GetArrayFromImage(sitk.ReadImage(files["jacobian"]))[2:-2, 2:-2, 2:-2]
    itk_jac = sitk.GetArrayFromImage(jacobian_determinant(field))[2:-2, 2:-2, 2:-2]
    assert np.median(np.abs(ours_jac - itk_jac)) < 0.05
    assert (out / "network_displacement.nii.gz").exists()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["local_ncc_stages"]) == {"before", "network_affine", "network", "refined_affine", "refined"}
    assert metrics["local_ncc_after"] == metrics["local_ncc_stages"]["refined"]


def test_pair_400_mm_apart_in_scanner_coordinates_still_aligns(known_pair, rigged_model):
    fixed, moving, truth = known_pair
    far = sitk.Image(moving)
    far.SetOrigin((np.asarray(moving.GetOrigin()) + [400.0, -150.0, 60.0]).tolist())
    result = match_pair(fixed, far, rigged_model, device="cpu", preset="ct", spacing_mm=2.0, max_size=64,
                        refine_iters=40)
    points = _interior_points(fixed, 100, 3, margin=6)
    true_far = np.array([truth.GetInverse().TransformPoint(p.tolist()) for p in points]) + [400.0, -150.0, 60.0]
    assert np.median(np.linalg.norm(result.map_points(points) - true_far, axis=1)) < 2.0


def test_refinement_worse_than_its_start_is_reported(known_pair, rigged_model, monkeypatch):
    """A refinement that ends less similar than no registration must say so."""
    import gvsl.refine as refine
    from gvsl.mapping import Mapping

    def sabotaged(fixed, moving, start, options, device, progress=None):
        return Mapping(np.diag([1.0, -1.0, 1.0, 1.0])), refine.RefineReport(start="sabotaged")

    monkeypatch.setattr(refine, "refine_mapping", sabotaged)
    fixed, moving, _ = known_pair
    result = match_pair(fixed, moving, rigged_model, device="cpu", preset="ct", spacing_mm=2.0, max_size=64,
                        refine_iters=5)
    assert "less similar" in result.metrics["refinement"]["warning"]


def test_scaling_and_squaring_equals_monai():
    from monai.networks.blocks import DVF2DDF
    from gvsl.refine import integrate_velocity
    torch.manual_seed(0)
    velocity = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 5, 6) * 3, size=(12, 14, 16), mode="trilinear")
    monai = DVF2DDF(num_steps=6, mode="bilinear", padding_mode="border")
    exact = velocity.double()
    assert torch.allclose(integrate_velocity(exact, steps=6), monai(exact), atol=1e-9)
    # float32: six squarings of a 7-voxel field, rounding only (gvsl.sampling's row coordinate)
    assert torch.allclose(integrate_velocity(velocity, steps=6), monai(velocity), atol=5e-4)


def test_sampling_coordinates_from_the_control_grid_equal_the_full_resolution_ones():
    """The refinement's fast path (channel map on the control grid, then one upsample) gives
    the coordinates of the plain path (upsample, add, map every voxel)."""
    from gvsl.refine import RefineOptions, _Level
    rng = np.random.default_rng(0)
    fixed = sitk.GetImageFromArray(rng.random((20, 22, 18)).astype(np.float32))
    fixed.SetSpacing((1.5, 1.2, 2.0))
    fixed.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    moving = sitk.GetImageFromArray(rng.random((16, 24, 20)).astype(np.float32))
    moving.SetSpacing((1.4, 1.3, 1.8))
    moving.SetOrigin((4.0, -3.0, 2.0))
    level = _Level(fixed, moving, np.array([1.5, 1.5, 2.0]), np.array([3.0, 3.0, 4.0]), RefineOptions(), "cpu")
    affine = torch.tensor([[1.02, 0.05, 0.0, 2.0], [-0.04, 0.97, 0.03, -1.0], [0.0, 0.02, 1.05, 0.5],
                           [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    control = torch.randn(1, 3, *level.control.shape)
    plain = level.coords_for(affine, level.upsample(control))
    fast = level.coords_for_control(affine, level.coords_for(affine), control)
    assert fast.shape == plain.shape
    assert torch.allclose(fast, plain, atol=1e-5)


def test_refinement_adam_follows_torch_adam_with_a_warmup_ramp():
    """WarmAdam (torch's functional Adam without the optimizer class, whose first step
    imports torch._dynamo) takes the steps of torch.optim.Adam under LambdaLR's ramp."""
    from gvsl.refine import WarmAdam
    torch.manual_seed(0)
    start_a, start_b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    target = torch.randn(3, 3, dtype=torch.float64)

    def loss(a, b):
        return ((a - target) ** 2).sum() + (b ** 4).sum() + (a.sum() * b.sum()) ** 2

    ours_a, ours_b = start_a.clone().requires_grad_(True), start_b.clone().requires_grad_(True)
    ref_a, ref_b = start_a.clone().requires_grad_(True), start_b.clone().requires_grad_(True)
    ours = WarmAdam([(ours_a, 0.01), (ours_b, 0.3)], warmup=4)
    ref = torch.optim.Adam([{"params": [ref_a], "lr": 0.01}, {"params": [ref_b], "lr": 0.3}])
    ramp = torch.optim.lr_scheduler.LambdaLR(ref, lambda step: min(1.0, (step + 1) / 4))
    for _ in range(12):
        ours.zero_grad()
        loss(ours_a, ours_b).backward()
        ours.step()
        ref.zero_grad()
        loss(ref_a, ref_b).backward()
        ref.step()
        ramp.step()
    assert not torch.allclose(ours_a, start_a)
    assert torch.allclose(ours_a, ref_a, atol=1e-12) and torch.allclose(ours_b, ref_b, atol=1e-12)


def test_lncc_box_filter_equals_monai():
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    from gvsl.refine import LocalNCC
    torch.manual_seed(0)
    a = torch.rand(1, 1, 16, 18, 20)
    b = a * 0.7 + 0.3 * torch.rand(1, 1, 16, 18, 20)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))  # where a whole 5^3 box fits
    ours = LocalNCC(b, 5, torch.ones_like(b), epsilon=1e-12)
    monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=5, kernel_type="rectangular",
                                                reduction="none", smooth_nr=0.0, smooth_dr=1e-12)
    expected = 1.0 + monai(a, b)[inner].mean()
    assert float(ours(a)) == pytest.approx(float(expected), abs=1e-4)


def test_lncc_default_epsilon_is_voxelmorphs_on_a_low_contrast_image():
    """VoxelMorph's NCC adds 1e-5 to the product of the two variances summed over the window;
    LocalNCC's default epsilon is the same on window means. On a low-contrast image (local
    standard deviation about 0.03 of the range, as inside white matter) a plain 1e-5 on the
    means flattened the NCC."""
    import torch.nn.functional as F
    from gvsl.refine import LocalNCC
    torch.manual_seed(0)
    a = 0.5 + 0.1 * torch.rand(1, 1, 16, 18, 20)
    b = a * 0.7 + 0.03 * torch.rand(1, 1, 16, 18, 20)
    ones, n = torch.ones(1, 1, 5, 5, 5, dtype=torch.float64), 125.0
    i, j = b.double(), a.double()  # VoxelMorph: I = fixed (y_true), J = moving (y_pred)
    i_sum, j_sum, i2_sum, j2_sum, ij_sum = (F.conv3d(v, ones) for v in (i, j, i * i, j * j, i * j))
    u_i, u_j = i_sum / n, j_sum / n
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * n
    i_var = i2_sum - 2 * u_i * i_sum + u_i * u_i * n
    j_var = j2_sum - 2 * u_j * j_sum + u_j * u_j * n
    expected = 1.0 - float((cross * cross / (i_var * j_var + 1e-5)).mean())
    assert float(LocalNCC(b, 5, torch.ones_like(b))(a)) == pytest.approx(expected, abs=1e-4)
    assert expected < 0.5  # the pair is well correlated ...
    assert float(LocalNCC(b, 5, torch.ones_like(b), epsilon=1e-5)(a)) > 0.9  # ... which 1e-5 on means hid


def test_lncc_gives_flat_windows_of_a_full_size_level_no_similarity():
    """A 1 mm brain's finest level (181 x 217 x 181) with a flat block late along every axis:
    there the squared NCC is 0 exactly, and the float32 running sums of the box filter must
    not turn their rounding into similarity (uncentred, it averaged 0.11 there)."""
    from gvsl.refine import LocalNCC
    torch.manual_seed(0)
    fixed = 0.2 + 0.4 * torch.rand(1, 1, 181, 217, 181)
    fixed[..., 100:, 120:, 100:] = 0.9
    fixed[..., :20] = 0.0  # air
    moving = fixed * 0.9 + 0.05
    flat = torch.zeros_like(fixed)
    flat[..., 110:170, 130:200, 110:170] = 1.0  # window centres inside the block
    assert 1.0 - float(LocalNCC(fixed, 7, flat)(moving)) < 0.01  # mean squared NCC there
    textured = torch.zeros_like(fixed)
    textured[..., 30:90, 30:110, 30:90] = 1.0
    assert 1.0 - float(LocalNCC(fixed, 7, textured)(moving)) > 0.99  # and the same image elsewhere: 1


def test_box_filter_gradient_is_the_true_gradient():
    """The box mean's hand-written backward (its adjoint) against finite differences and
    against autograd through a convolution with a box kernel; windows wider than the output too."""
    import torch.nn.functional as F
    from gvsl.refine import box_filter
    torch.manual_seed(0)
    x = torch.rand(1, 2, 9, 10, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: box_filter(v, 3), (x,))
    assert torch.autograd.gradcheck(lambda v: box_filter(v, 4, same_size=True), (x,))
    for window in (5, 7):  # at 7 the output (3 x 4 x 5) is narrower than the window
        kernel = torch.ones(2, 1, window, window, window, dtype=torch.float64) / window ** 3
        weights = torch.rand(1, 2, *(n - window + 1 for n in x.shape[2:]), dtype=torch.float64)
        ours = box_filter(x, window)
        by_convolution = F.conv3d(x, kernel, groups=2)
        assert torch.allclose(ours, by_convolution, atol=1e-12)
        grad_ours, = torch.autograd.grad((ours * weights).sum(), x)
        grad_convolution, = torch.autograd.grad((by_convolution * weights).sum(), x)
        assert torch.allclose(grad_ours, grad_convolution, atol=1e-12)


def test_box_filter_on_a_large_volume_equals_the_convolution():
    """Past 1 M values the outermost axis is summed slice by slice instead of by cumsum."""
    import torch.nn.functional as F
    from gvsl.refine import box_filter
    torch.manual_seed(0)
    x = torch.rand(1, 3, 100, 60, 60, dtype=torch.float64)
    assert x.numel() >= 1 << 20
    kernel = torch.ones(3, 1, 7, 7, 7, dtype=torch.float64) / 343
    assert torch.allclose(box_filter(x, 7), F.conv3d(x, kernel, groups=3), atol=1e-10)


def test_mind_descriptor_is_modality_independent():
    """MIND-SSC of an image and of a monotone remapping of it (a contrast change) agree."""
    from gvsl.refine import mind_ssc
    torch.manual_seed(0)
    a = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 24, 24), 3, 1, 1)
    inverted = 1.0 - a ** 2
    da, db = mind_ssc(a), mind_ssc(inverted)
    assert da.shape == (1, 12, 24, 24, 24)
    other = mind_ssc(torch.rand(1, 1, 24, 24, 24))
    assert (da - db).abs().mean() < 0.5 * (da - other).abs().mean()


def test_plateau_waits_for_the_warm_up_then_stops_on_a_flat_loss():
    from gvsl.refine import Plateau
    rising_then_flat = [1.0, 1.2, 1.3, 1.1, 0.9, 0.8] + [0.8] * 20
    plateau = Plateau(tolerance=1e-3, patience=4, min_steps=6)
    stops = [plateau.converged(v) for v in rising_then_flat]
    assert not any(stops[:6])  # never inside the warm-up, although the loss rose there
    assert stops.index(True) == 9  # four flat steps after the last improvement at index 5
    improving = Plateau(tolerance=1e-3, patience=4)
    assert not any(improving.converged(1.0 - 0.01 * k) for k in range(50))
    off = Plateau(tolerance=0.0, patience=4)
    assert not any(off.converged(1.0) for _ in range(50))


def test_refine_detail_sets_the_finest_level_of_a_1_mm_brain_sized_volume():
    """``full`` refines a 1 mm brain-sized volume (182 x 218 x 182) at its own voxel size and
    ``fast`` at about 2 mm; a 2 mm one is refined at 2 mm either way."""
    from gvsl.refine import DETAIL_MAX_VOXELS, RefineOptions, level_spacings

    def finest(size, spacing, detail):
        image = sitk.Image(list(size), sitk.sitkFloat32)
        image.SetSpacing([spacing] * 3)
        return level_spacings(image, RefineOptions(max_voxels=DETAIL_MAX_VOXELS[detail]))[-1]

    assert finest((182, 218, 182), 1.0, "full") == pytest.approx([1.0] * 3)
    fast = finest((182, 218, 182), 1.0, "fast")
    assert 1.8 < fast[0] < 2.2 and np.allclose(fast, fast[0])
    for detail in DETAIL_MAX_VOXELS:
        assert finest((91, 109, 91), 2.0, detail) == pytest.approx([2.0] * 3)


def test_refine_detail_reaches_the_refinement_and_is_checked(known_pair, rigged_model, monkeypatch):
    import gvsl.refine
    fixed, moving = known_pair[0], known_pair[1]
    with pytest.raises(ValueError, match="refine_detail"):
        match_pair(fixed, moving, rigged_model, device="cpu", refine_detail="finest")
    seen = []
    original = gvsl.refine.refine_mapping

    def spy(fixed_image, moving_image, start, options, *args, **kwargs):
        seen.append(options.max_voxels)
        return original(fixed_image, moving_image, start, options, *args, **kwargs)

    monkeypatch.setattr(gvsl.refine, "refine_mapping", spy)
    for detail in ("fast", "full", None):
        result = match_pair(fixed, moving, rigged_model, device="cpu", refine_detail=detail, refine_iters=8)
        assert result.metrics["refinement"]["detail"] == (detail or "full")  # None: RefineOptions' default
    caps = gvsl.refine.DETAIL_MAX_VOXELS
    assert seen == [caps["fast"], caps["full"], caps["full"]]


def test_learning_rate_ramps_up_over_the_warm_up():
    """Under a constant gradient Adam moves a parameter by exactly its learning rate, so the
    step sizes are the ramp."""
    from gvsl.refine import WarmAdam
    parameter = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = WarmAdam([(parameter, 0.5)], warmup=4)
    positions = [0.0]
    for _ in range(6):
        optimiser.zero_grad()
        parameter.sum().backward()
        optimiser.step()
        positions.append(float(parameter.detach()))
    steps = [before - after for before, after in zip(positions, positions[1:])]
    assert steps == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5], abs=1e-6)


def test_tolerance_ends_stages_early_at_about_the_same_loss(known_pair, rigged_model):
    fixed, moving = known_pair[0], known_pair[1]
    every_step = match_pair(fixed, moving, rigged_model, device="cpu", refine_tolerance=0.0)
    early = match_pair(fixed, moving, rigged_model, device="cpu", refine_tolerance=1e-3)
    steps = [r["refinement"]["iterations"] for r in (every_step.metrics, early.metrics)]
    assert steps[1] < steps[0]
    final = [[lv["loss"] for lv in r.metrics["refinement"]["levels"] if lv["stage"] == "deformable"][-1]
             for r in (every_step, early)]
    assert final[1] < final[0] + 0.02


def _normalised_phantom_in_a_wide_field(shift_mm=(0.0, 0.0, 0.0)):
    from gvsl.samples import synthetic_volume
    body, _ = synthetic_volume(size=(36, 36, 28), spacing=(2.0, 2.0, 2.0), seed=2)
    if any(shift_mm):
        body = sitk.Resample(body, body, sitk.TranslationTransform(3, shift_mm), sitk.sitkLinear, -1000.0)
    body = sitk.Clamp((sitk.Cast(body, sitk.sitkFloat32) + 1000.0) / 2000.0, lowerBound=0.0, upperBound=1.0)
    return sitk.ConstantPad(body, [18, 18, 12], [18, 18, 12], 0.0)  # air all around: half the field is empty


def test_foreground_crop_keeps_physical_positions():
    from gvsl.refine import crop_to_foreground
    wide = _normalised_phantom_in_a_wide_field()
    cropped = crop_to_foreground(wide, margin_mm=6.0)
    assert np.prod(cropped.GetSize()) < 0.5 * np.prod(wide.GetSize())
    for index in ([0, 0, 0], [5, 7, 3], [s - 1 for s in cropped.GetSize()]):
        point = cropped.TransformIndexToPhysicalPoint(index)
        assert cropped[index] == wide[wide.TransformPhysicalPointToIndex(point)]
    foreground = sitk.GetArrayViewFromImage(wide) > 0.05
    assert foreground.sum() == (sitk.GetArrayViewFromImage(cropped) > 0.05).sum()  # nothing of the body is lost
    assert crop_to_foreground(sitk.Image(8, 8, 8, sitk.sitkFloat32), 6.0).GetSize() == (8, 8, 8)  # no foreground


def test_refinement_on_the_foreground_box_gives_the_whole_field_answer():
    from gvsl.mapping import Mapping
    from gvsl.refine import RefineOptions, refine_mapping
    fixed = _normalised_phantom_in_a_wide_field()
    moving = _normalised_phantom_in_a_wide_field(shift_mm=(4.0, -3.0, 2.0))
    answers = {}
    for margin in (None, 12.0):
        options = RefineOptions(iterations=30, levels=2, foreground_margin_mm=margin)
        mapping, report = refine_mapping(fixed, moving, Mapping(np.eye(4)), options)
        answers[margin] = mapping
    assert np.prod(answers[12.0].grid.size) < 0.6 * np.prod(answers[None].grid.size)
    inside = _interior_points(fixed, 100, 3, margin=22)  # points on the body
    truth = inside - np.array([4.0, -3.0, 2.0])  # fixed(p) = moving(p - shift)
    error = {margin: np.linalg.norm(mapping.map_points(inside) - truth, axis=1) for margin, mapping in answers.items()}
    assert np.median(error[12.0]) < 1.0
    # At least as good as optimising over the whole field of view (here better: 0.9 vs 1.7 mm mean).
    assert error[12.0].mean() <= error[None].mean() + 0.25


def test_refinement_without_the_network_start_ignores_its_affine_and_field():
    """network_start=False (the benchmark's no-network baseline): a start far off is not a
    candidate and its local field is not carried; the geometric starts still find the shift."""
    from gvsl.conventions import Grid
    from gvsl.mapping import Mapping
    from gvsl.refine import RefineOptions, refine_mapping
    fixed = _normalised_phantom_in_a_wide_field()
    moving = _normalised_phantom_in_a_wide_field(shift_mm=(4.0, -3.0, 2.0))
    far = np.eye(4)
    far[:3, 3] = (40.0, 0.0, 0.0)
    grid = Grid.of(fixed).coarsened(8 ** 3)
    field = torch.full((1, 3, *grid.shape), 5.0)
    start = Mapping(far, field, grid)
    used = {}
    for network_start in (True, False):
        options = RefineOptions(iterations=30, levels=2, network_start=network_start)
        mapping, report = refine_mapping(fixed, moving, start, options)
        used[network_start] = report
    assert "network" in used[True].start_losses
    assert "network" not in used[False].start_losses and used[False].local_start == "none"
    inside = _interior_points(fixed, 100, 3, margin=22)
    error = np.linalg.norm(mapping.map_points(inside) - (inside - np.array([4.0, -3.0, 2.0])), axis=1)
    assert np.median(error) < 1.0
