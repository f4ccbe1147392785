"""gvsl.sampling: trilinear sampling through the 2-D kernel equals F.grid_sample (values and
gradients, both padding rules, points inside, on and beyond the border)."""
import pytest
import torch
import torch.nn.functional as F

from gvsl.sampling import SlabVolume, sample_trilinear


def assert_same_values_and_gradients(ours, expected, inputs):
    """Values to 1e-12 and the gradients of a random weighting of the outputs to 1e-10 (float64)."""
    assert torch.allclose(ours, expected, atol=1e-12)
    weights = torch.rand_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs, retain_graph=True)
    our_grads = torch.autograd.grad((ours * weights).sum(), inputs, retain_graph=True)
    for mine, theirs in zip(our_grads, expected_grads):
        assert torch.allclose(mine, theirs, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("shape", [(7, 9, 11), (1, 5, 6), (12, 3, 8), (4, 1, 5)])
def test_values_and_gradients_equal_grid_sample(padding_mode, shape):
    torch.manual_seed(0)
    volume = torch.rand(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    # normalised coordinates out to 1.3: a third of the points fall outside the volume
    grid = (torch.rand(2, 4, 5, 6, 3, dtype=torch.float64) * 2.6 - 1.3).requires_grad_(True)
    expected = F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    ours = sample_trilinear(volume, grid, padding_mode)
    assert ours.shape == expected.shape == (2, 3, 4, 5, 6)
    assert_same_values_and_gradients(ours, expected, (volume, grid))


def test_a_prepared_slab_samples_like_the_volume_in_float32():
    torch.manual_seed(1)
    volume = F.avg_pool3d(torch.rand(1, 1, 40, 50, 30), 3, 1, 1)
    grid = torch.rand(1, 20, 25, 15, 3) * 2.2 - 1.1
    slab = SlabVolume(volume, "zeros")
    expected = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # float32 rounding of the tall image's row coordinate: far below a voxel's contrast
    assert torch.allclose(sample_trilinear(slab, grid), expected, atol=2e-4)
    assert float((sample_trilinear(slab, grid) - expected).abs().mean()) < 2e-5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        SlabVolume(torch.rand(1, 4, 4, 4))
    with pytest.raises(ValueError, match="padding_mode"):
        SlabVolume(torch.rand(1, 1, 4, 4, 4), "reflection")


# ---- gvsl.mapping.resample_separable: three 1-D interpolations for grids with the same axes
import numpy as np  # noqa: E402

from gvsl.conventions import sample_matrix  # noqa: E402
from gvsl.mapping import Slab, axis_permutation, resample_separable  # noqa: E402


def _voxel_map(axes, scales, offsets):
    matrix = np.eye(4)
    matrix[:3, :3] = 0.0
    for source_axis, (axis, scale, offset) in enumerate(zip(axes, scales, offsets)):
        matrix[source_axis, axis] = scale
        matrix[source_axis, 3] = offset
    return matrix


@pytest.mark.parametrize("axes,scales,offsets", [
    ((0, 1, 2), (0.31, 0.27, 0.4), (-1.3, 2.0, 0.5)),      # upsampling, partly beyond the border
    ((2, 0, 1), (0.3, -0.45, 0.2), (1.0, 9.0, -0.7)),      # permuted axes with a flip
    ((1, 2, 0), (-0.5, 1.7, 0.25), (10.0, -3.0, 0.0)),     # downsampling along one axis
])
@pytest.mark.parametrize("shape", [(7, 9, 11), (1, 6, 5)])
@pytest.mark.parametrize("dense_max", [256, 0])  # matrix product, and the gather for large axes
def test_separable_resampling_equals_grid_sample_with_border_padding(axes, scales, offsets, shape, dense_max,
                                                                     monkeypatch):
    from gvsl import mapping as mapping_module
    monkeypatch.setattr(mapping_module, "DENSE_INTERPOLATION_MAX_SIZE", dense_max)
    torch.manual_seed(2)
    volume = torch.randn(1, 3, *shape)
    to_source = _voxel_map(axes, scales, offsets)
    slab = Slab(3, 10, 20, 17)
    ours = resample_separable(volume, to_source, slab)
    expected = F.grid_sample(volume, slab.apply(sample_matrix(shape) @ to_source), mode="bilinear",
                             padding_mode="border", align_corners=True)
    assert ours.shape == expected.shape == (1, 3, 7, 20, 17)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_an_oblique_map_is_not_separable():
    rotation = np.eye(4)
    angle = np.deg2rad(10)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert axis_permutation(rotation) is None
    assert resample_separable(torch.zeros(1, 3, 4, 4, 4), rotation, Slab(0, 2, 3, 3)) is None
    assert axis_permutation(np.diag([300.0, 2.0, 0.5, 1.0])) == (0, 1, 2)


def test_mapping_exports_through_the_separable_path_equal_the_grid_sample_path(monkeypatch):
    """warp_slabs / displacement_slabs / jacobian_slabs on an output grid with the local
    grid's axes (the fast path) equal the same exports with the fast path switched off."""
    from gvsl import mapping as mapping_module
    from gvsl.conventions import Grid
    from gvsl.mapping import Mapping

    torch.manual_seed(3)
    local_grid = Grid((-20.0, 10.0, 5.0), (4.0, 3.5, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (9, 8, 7))
    output_grid = Grid((-22.0, 8.0, 3.0), (1.1, 0.9, 1.7), (1, 0, 0, 0, 1, 0, 0, 0, 1), (33, 30, 21))
    affine = np.eye(4)
    affine[:3, :3] += 0.02 * np.random.default_rng(0).standard_normal((3, 3))
    affine[:3, 3] = (1.5, -2.0, 0.7)
    mapping = Mapping(affine, F.avg_pool3d(torch.randn(1, 3, 7, 8, 9) * 6, 3, 1, 1), local_grid)
    moving = torch.rand(1, 1, 25, 28, 30)
    moving_grid = Grid((-25.0, 5.0, 0.0), (1.3, 1.2, 1.4), (1, 0, 0, 0, 1, 0, 0, 0, 1), (30, 28, 25))

    def exports():
        warped = torch.cat([v for _, _, v in mapping.warp_slabs(output_grid, moving, moving_grid, -1.0,
                                                                 slab_voxels=2000)])
        shift = torch.cat([u for _, _, u in mapping.displacement_slabs(output_grid, slab_voxels=2000)])
        det = torch.cat([j for _, _, j in mapping.jacobian_slabs(output_grid, slab_voxels=2000)])
        return warped, shift, det

    calls = []
    original = mapping_module.resample_separable
    monkeypatch.setattr(mapping_module, "resample_separable",
                        lambda *a: calls.append(1) or original(*a))
    fast = exports()
    assert calls, "the axis-aligned export did not take the separable path"
    monkeypatch.setattr(mapping_module, "resample_separable", lambda *a: None)
    slow = exports()
    for ours, expected in zip(fast, slow):
        assert ours.shape == expected.shape
        assert torch.allclose(ours, expected, atol=2e-4)


@pytest.mark.parametrize("dims, channels", [(2, 1), (2, 3), (3, 1), (3, 2)])
def test_parallel_grid_sample_equals_grid_sample_values_and_gradients(dims, channels, monkeypatch):
    """The points split over batch entries (one per thread), an uneven split included."""
    from gvsl import sampling
    monkeypatch.setattr(sampling, "PARALLEL_MIN_POINTS", 1)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    torch.manual_seed(5)
    volume = torch.rand(1, channels, *((7, 9, 11) if dims == 3 else (9, 11)), dtype=torch.float64,
                        requires_grad=True)
    grid = (torch.rand(1, *((5, 7, 3) if dims == 3 else (7, 13)), dims, dtype=torch.float64) * 2.4 - 1.2)
    grid.requires_grad_(True)
    for padding_mode in ("zeros", "border"):
        options = dict(mode="bilinear", padding_mode=padding_mode, align_corners=True)
        expected = F.grid_sample(volume, grid, **options)
        ours = sampling.grid_sample_parallel(volume, grid, **options)
        assert ours.shape == expected.shape
        assert_same_values_and_gradients(ours, expected, (volume, grid))


def test_trilinear_sampling_of_one_volume_through_the_split_equals_grid_sample(monkeypatch):
    from gvsl import sampling
    monkeypatch.setattr(sampling, "PARALLEL_MIN_POINTS", 1)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    torch.manual_seed(6)
    volume = torch.rand(1, 2, 6, 8, 10, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(1, 3, 5, 7, 3, dtype=torch.float64) * 2.6 - 1.3).requires_grad_(True)
    expected = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    ours = sample_trilinear(volume, grid, "zeros")
    assert torch.allclose(ours, expected, atol=1e-12)
    expected_grads = torch.autograd.grad(expected.sum(), (volume, grid))
    for mine, theirs in zip(torch.autograd.grad(ours.sum(), (volume, grid)), expected_grads):
        assert torch.allclose(mine, theirs, atol=1e-10)


@pytest.mark.parametrize("window", [3, 7])
def test_separable_box_dilation_equals_the_3d_max_pool(window):
    from gvsl.refine import dilate_box
    torch.manual_seed(3)
    mask = (torch.rand(1, 1, 9, 12, 10) > 0.93).float()
    expected = F.max_pool3d(mask, kernel_size=window, stride=1, padding=window // 2)
    assert torch.equal(dilate_box(mask, window), expected)


@pytest.mark.parametrize("source, target", [((5, 7, 6), (9, 13, 11)), ((2, 3, 9), (17, 3, 20))])
def test_separable_upsampling_equals_trilinear_interpolation(source, target):
    from gvsl.refine import upsample_separable, upsampling_matrices
    torch.manual_seed(4)
    volume = torch.randn(1, 3, *source, requires_grad=True)
    expected = F.interpolate(volume, size=target, mode="trilinear", align_corners=True)
    ours = upsample_separable(volume, upsampling_matrices(source, target, "cpu"))
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-5)
    weights = torch.randn_like(expected)
    expected_grad, = torch.autograd.grad((expected * weights).sum(), volume)
    our_grad, = torch.autograd.grad((ours * weights).sum(), volume)
    assert torch.allclose(our_grad, expected_grad, atol=1e-4)
