"""gvsl.sampling: trilinear sampling through the 2-D kernel equals F.grid_sample (values and
gradients, both padding rules, points inside, on and beyond the border)."""
import pytest
import torch
import torch.nn.functional as F

from gvsl.sampling import SlabVolume, sample_trilinear


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
    assert torch.allclose(ours, expected, atol=1e-12)
    weights = torch.rand_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (volume, grid))
    our_grads = torch.autograd.grad((ours * weights).sum(), (volume, grid))
    for mine, theirs in zip(our_grads, expected_grads):
        assert torch.allclose(mine, theirs, atol=1e-10)


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
