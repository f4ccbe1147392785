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
    fixed, moving, _ = known_pair
    out = tmp_path_factory.mktemp("match")
    result = match_pair(fixed, moving, rigged_model, device="cpu", preset="ct", spacing_mm=2.0, max_size=64)
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
    result = match_pair(fixed, known_pair[1], rigged_model, device="cpu", preset="ct", spacing_mm=2.0, max_size=64)
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
    from gvsl.demo import run_demo
    summary = run_demo(out=tmp_path / "demo", device="cpu", quiet=True)
    assert (tmp_path / "demo" / "report.png").exists()
    assert summary["landmark_error_mm"]["before"]["mean"] > 5
    for key in ("before", "after"):
        assert 0 <= summary["mean_dice"][key] <= 1
    # the shipped model must help on its own demo (figures in its model card)
    assert summary["landmark_error_mm"]["after"]["mean"] < summary["landmark_error_mm"]["before"]["mean"]
    assert summary["mean_dice"]["after"] > summary["mean_dice"]["before"]
    assert summary["local_ncc"]["after"] > summary["local_ncc"]["before"]


def test_working_grid_defaults_to_the_models_training_grid(known_pair, rigged_model):
    fixed, moving, _ = known_pair
    rigged_model.checkpoint_meta = {"preprocessing": {"spacing": 3.0}, "config": {"patch": [32, 32, 32]}}
    try:
        result = match_pair(fixed, moving, rigged_model, device="cpu", preset="ct")
    finally:
        del rigged_model.checkpoint_meta
    grid = result.metrics["working_grid"]
    assert max(grid["shape_dhw"]) <= 32 and grid["spacing_mm"] >= 3.0
