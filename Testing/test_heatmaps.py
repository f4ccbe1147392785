"""The heatmap accuracy measure on cases with a known answer, multi-scale descriptors, and
the same heatmap through every path (engine, state file of the child process)."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import gvsl
from gvsl.descriptors import STRIDES, descriptor_features, similarity
from gvsl.conventions import transform_points
from gvsl.heatmap_eval import centroid_queries, heatmap_accuracy
from gvsl.match import MatchResult, match_pair
from gvsl.samples import synthetic_volume


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gvsl.GVSL(width=0.25).eval()


@pytest.fixture(scope="module")
def volume():
    # A textured phantom: every neighbourhood differs, so a correct peak is unique.
    image, labels = synthetic_volume(size=(40, 36, 32), spacing=(3.0, 3.0, 3.0), seed=2)
    rng = np.random.default_rng(1)
    noise = sitk.GetImageFromArray(rng.normal(0, 300, sitk.GetArrayViewFromImage(image).shape).astype(np.float32))
    noise.CopyInformation(image)
    return image + sitk.SmoothingRecursiveGaussian(noise, 3.0), labels


def interior_points(result, count=20, margin=6, seed=0):
    rng = np.random.default_rng(seed)
    shape = np.asarray(result.fixed_grid.shape)
    voxels = rng.integers(margin, shape - margin, size=(count, 3)).astype(float)
    m = result.fixed_grid.voxel_to_physical()
    return voxels @ m[:3, :3].T + m[:3, 3]


def test_every_decoder_level_is_kept_unit_norm(model, volume):
    result = match_pair(volume[0], volume[0], model, device="cpu", preset="ct", spacing_mm=3.0, max_size=64)
    shape = result.fixed_grid.shape
    for stride in STRIDES:
        key = "fixed" if stride == 1 else f"fixed@{stride}"
        level = result.features[key]
        assert tuple(level.shape[1:]) == tuple(-(-s // 16) * 16 // stride for s in shape) or stride == 1
        np.testing.assert_allclose(level.norm(dim=0).numpy(), 1.0, atol=1e-4)


def test_identity_pair_measures_zero_error(model, volume):
    result = match_pair(volume[0], volume[0], model, device="cpu", preset="ct", spacing_mm=3.0, max_size=64)
    points = interior_points(result)
    # The integer maximum: the sub-voxel peak (tested below) moves an exact answer by a fraction.
    summary = heatmap_accuracy(result, points, points, subvoxel=False)
    assert summary["median_mm"] == pytest.approx(0.0, abs=1e-6)
    # Coarse levels are normalised on the stride-2 grid (not per working voxel), which moves
    # a few peaks by one voxel.
    assert summary["p90_mm"] <= 1.5 * result.moving_grid.spacing[0]
    assert summary["peaked_fraction"] < 0.05  # the map is not flat


def test_known_shift_measures_the_shift(model, volume):
    """Moving = fixed moved by (12, -9, 6) mm in scanner space: the measure against the true
    points gives ~0 mm, and the best matches sit exactly one shift away from the queries."""
    shift = np.array([12.0, -9.0, 6.0])
    fixed = volume[0]
    moving = sitk.Image(fixed)
    moving.SetOrigin((np.asarray(fixed.GetOrigin()) + shift).tolist())
    result = match_pair(fixed, moving, model, device="cpu", preset="ct", spacing_mm=3.0, max_size=64)
    points = interior_points(result)
    summary = heatmap_accuracy(result, points, points + shift, subvoxel=False)
    assert summary["median_mm"] == pytest.approx(0.0, abs=1e-6)
    wrong = heatmap_accuracy(result, points, points, subvoxel=False)  # without the shift the error is the shift
    assert wrong["median_mm"] == pytest.approx(np.linalg.norm(shift), abs=1e-6)


def test_content_shift_inside_the_grid_is_found_within_a_voxel(volume):
    """The anatomy itself moves by 2 working voxels along d (same geometry), with the shipped
    model: the descriptors differ near the border, and the best matches must still land
    within about a voxel. (A random network's coarse levels say "same grid position".)"""
    model = None
    fixed = volume[0]
    array = sitk.GetArrayFromImage(fixed)
    moved = np.full_like(array, float(array.min()))
    moved[2:] = array[:-2]  # +2 voxels along numpy axis 0 (ITK k)
    moving = sitk.GetImageFromArray(moved)
    moving.CopyInformation(fixed)
    result = match_pair(fixed, moving, model, device="cpu", preset="ct", spacing_mm=3.0, max_size=64)
    shift = fixed.TransformContinuousIndexToPhysicalPoint((0, 0, 2)) - np.asarray(fixed.GetOrigin())
    points = interior_points(result, margin=8)
    summary = heatmap_accuracy(result, points, points + shift)
    assert summary["median_voxels"] <= 1.5  # vs 2 voxels for "no motion"
    assert heatmap_accuracy(result, points, points)["median_mm"] > summary["median_mm"]


def test_state_file_gives_the_same_heatmap(model, volume, tmp_path):
    """The Slicer module reads a child process's result through save_state/load_state: the
    multi-scale levels must travel, and the map must be the one of the in-process result."""
    fixed, moving = volume[0], sitk.Image(volume[0])
    moving.SetOrigin((np.asarray(fixed.GetOrigin()) + 5.0).tolist())
    result = match_pair(fixed, moving, model, device="cpu", preset="ct", spacing_mm=3.0, max_size=64)
    result.save(tmp_path, report=False)
    result.save_state(tmp_path / "state.npz")
    loaded = MatchResult.load_state(tmp_path, fixed, moving)
    assert set(loaded.features) == set(result.features)
    point = interior_points(result, count=1)[0]
    a, best_a, score_a = result.heatmap(point, "fixed")
    b, best_b, score_b = loaded.heatmap(point, "fixed")
    # Features travel as float16: the same best voxel, and a sub-voxel peak within 5 % of a voxel.
    np.testing.assert_allclose(result.heatmap(point, "fixed", subvoxel=False)[1],
                               loaded.heatmap(point, "fixed", subvoxel=False)[1], atol=1e-6)
    np.testing.assert_allclose(best_a, best_b, atol=0.05 * result.moving_grid.spacing[0])
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b), atol=5e-3)


def test_features_without_coarse_levels_give_the_last_layer_map(model, volume):
    result = match_pair(volume[0], volume[0], model, device="cpu", preset="ct", spacing_mm=3.0, max_size=64)
    only_last = {k: v for k, v in result.features.items() if "@" not in k}
    voxel = np.array([10.0, 12.0, 14.0])
    sim, best, score = similarity(only_last, "fixed", "moving", voxel, subvoxel=False)
    direct = torch.einsum("c,cdhw->dhw", only_last["fixed"][:, 10, 12, 14], only_last["moving"])
    np.testing.assert_allclose(sim.numpy(), direct.numpy(), atol=1e-5)
    np.testing.assert_allclose(best, voxel)


def test_centroid_queries_pair_the_same_structure_parts(volume):
    _, labels = volume
    moved = sitk.Image(labels)
    moved.SetOrigin((np.asarray(labels.GetOrigin()) + np.array([4.0, 0.0, -2.0])).tolist())
    fixed_pts, moving_pts = centroid_queries(labels, moved, split=2)
    assert len(fixed_pts) >= 8
    np.testing.assert_allclose(moving_pts - fixed_pts, np.tile([4.0, 0.0, -2.0], (len(fixed_pts), 1)), atol=1e-6)


def test_demo_reports_a_peaked_heatmap_at_the_right_place(tmp_path):
    """The shipped model on the demo pair: the best match lands within a few working voxels
    of the true point and the map is not flat (the whole body used to be 'hot')."""
    from gvsl.demo import run_demo
    summary = run_demo(out=tmp_path / "demo", device="cpu", quiet=True)
    heat = summary["heatmap"]
    assert heat["points"] == 60
    assert heat["median_voxels"] <= 3.0
    assert heat["peaked_fraction"] < 0.1


def test_subvoxel_peak_recovers_a_fractional_maximum():
    from gvsl.descriptors import subvoxel_peak
    true_peak = np.array([10.3, 7.8, 5.5])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 16, 12)], indexing="ij"), -1)
    values = torch.from_numpy(np.exp(-((grid - true_peak) ** 2).sum(-1) / (2 * 2.0 ** 2))).float()
    best = np.unravel_index(int(torch.argmax(values)), values.shape)
    refined = subvoxel_peak(values, best)
    assert np.abs(refined - true_peak).max() < 0.1
    assert np.linalg.norm(refined - true_peak) < 0.5 * np.linalg.norm(np.asarray(best) - true_peak)
    # On the border (no neighbour on one side) an axis keeps its integer index.
    edge = torch.from_numpy(np.exp(-((grid - np.array([0.2, 7.8, 5.5])) ** 2).sum(-1) / 8.0)).float()
    best_edge = np.unravel_index(int(torch.argmax(edge)), edge.shape)
    assert subvoxel_peak(edge, best_edge)[0] == 0.0
    far_edge = torch.from_numpy(np.exp(-((grid - np.array([10.3, 15.4, 5.5])) ** 2).sum(-1) / 8.0)).float()
    best_far = np.unravel_index(int(torch.argmax(far_edge)), far_edge.shape)
    assert best_far[1] == 15 and subvoxel_peak(far_edge, best_far)[1] == 15.0
    # A higher neighbour (the coarse-to-fine window's edge) keeps the integer index; a tie goes halfway.
    line = torch.zeros(20, 16, 12)
    line[10, 7, 5], line[10, 8, 5], line[10, 6, 5] = 1.0, 1.5, 0.5
    assert subvoxel_peak(line, (10, 7, 5))[1] == 7.0
    line[10, 8, 5] = 1.0
    assert subvoxel_peak(line, (10, 7, 5))[1] == pytest.approx(7.5)


def test_heatmap_best_match_is_subvoxel(volume):
    """The anatomy moves by half a working voxel on the same grid: the integer maximum is
    half a voxel off at best, the sub-voxel one closer with the shipped model (whose maps
    are smooth around the peak; a random network's are not, and it gains nothing)."""
    model = None
    fixed = volume[0]
    shift = np.array([0.0, 0.0, 1.5])  # half of a 3 mm working voxel
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (-shift).tolist()), sitk.sitkBSpline, 0.0)
    result = match_pair(fixed, moving, model, device="cpu", preset="ct", spacing_mm=3.0, max_size=64)
    points = interior_points(result)
    errors_mm = []
    for subvoxel in (False, True):
        errors = []
        for p in points:
            voxel = transform_points(result.fixed_grid.physical_to_voxel(), p.reshape(1, 3))[0]
            _, best, _ = similarity(result.features, "fixed", "moving", voxel, subvoxel=subvoxel)
            best_lps = transform_points(result.moving_grid.voxel_to_physical(), best)
            errors.append(np.linalg.norm(best_lps - (p + shift)))
        errors_mm.append(np.median(errors))
    assert errors_mm[0] >= 1.4  # the integer maximum: half a voxel or more
    assert errors_mm[1] < errors_mm[0] - 0.2
