"""Warping by a voxel affine / displacement agrees with SimpleITK in physical space."""
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from gvsl.conventions import (Grid, LPS_TO_RAS, affine_to_flow, compose_affine_then_local, lps_to_ras,
                              voxel_affine_to_matrix, warp)
from gvsl.network import affine_from_parameters

DIRECTION = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # a rotated, non-trivial frame


def smooth_volume(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand((1, 1, *[s // 4 for s in shape]), generator=g)
    return F.interpolate(v, size=shape, mode="trilinear", align_corners=True)


def as_image(volume, spacing=(1.2, 0.8, 2.0), origin=(10.0, -5.0, 3.0)):
    image = sitk.GetImageFromArray(volume[0, 0].numpy().astype(np.float64))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(DIRECTION)
    return image


def interior(a, b, margin=4):
    s = (slice(margin, -margin),) * 3
    return a[s], b[s]


def test_affine_warp_matches_simpleitk():
    shape = (24, 28, 32)
    volume = smooth_volume(shape)
    image = as_image(volume)
    affine = affine_from_parameters(torch.tensor([[0.1, -0.05, 0.08]]), torch.tensor([[1.05, 0.95, 1.02]]),
                                    torch.tensor([[1.5, -2.0, 0.7]]), torch.tensor([[0.02, -0.03, 0.01, 0.0, 0.04, -0.02]]))
    ours = warp(volume.double(), affine_to_flow(affine.double(), shape))[0, 0].numpy()

    grid = Grid.of(image)
    physical = grid.voxel_to_physical() @ voxel_affine_to_matrix(affine[0].double().numpy(), shape) @ grid.physical_to_voxel()
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(physical[:3, :3].ravel().tolist())
    tx.SetTranslation(physical[:3, 3].tolist())
    itk = sitk.GetArrayFromImage(sitk.Resample(image, image, tx, sitk.sitkLinear, 0.0))
    a, b = interior(ours, itk)
    assert np.abs(a - b).max() < 1e-6


def test_displacement_warp_matches_simpleitk():
    shape = (24, 28, 32)
    volume = smooth_volume(shape, seed=1)
    image = as_image(volume)
    g = torch.Generator().manual_seed(2)
    flow = F.interpolate(torch.randn((1, 3, 4, 4, 4), generator=g, dtype=torch.float64) * 1.5, size=shape,
                         mode="trilinear", align_corners=True)
    ours = warp(volume.double(), flow)[0, 0].numpy()

    grid = Grid.of(image)
    linear = grid.voxel_to_physical()[:3, :3]
    displacement_mm = np.einsum("ij,jdhw->dhwi", linear, flow[0].numpy())
    field = sitk.GetImageFromArray(displacement_mm, isVector=True)
    field.CopyInformation(image)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk = sitk.GetArrayFromImage(sitk.Resample(image, image, tx, sitk.sitkLinear, 0.0))
    a, b = interior(ours, itk)
    assert np.abs(a - b).max() < 1e-6


def test_fused_field_equals_affine_after_local_warp():
    shape = (16, 20, 24)
    affine = affine_from_parameters(torch.tensor([[0.05, 0.0, -0.05]]), torch.tensor([[1.0, 1.1, 0.9]]),
                                    torch.tensor([[0.5, 0.0, -1.0]]), torch.zeros(1, 6)).double()
    local = torch.randn((1, 3, 4, 5, 6), dtype=torch.float64)
    local = F.interpolate(local, size=shape, mode="trilinear", align_corners=True)
    fused = compose_affine_then_local(affine, local)
    # T(p) = A(p + u(p)): sample the affinely warped volume at p + u(p).
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))[None]
    mapped = coords + local
    c = ((torch.tensor(shape, dtype=torch.float64) - 1) / 2).view(1, 3, 1, 1, 1)
    expected = torch.einsum("nij,njdhw->nidhw", affine[:, :, :3], mapped - c) + affine[:, :, 3].view(1, 3, 1, 1, 1) + c
    torch.testing.assert_close(coords + fused, expected)


def test_voxel_to_physical_matches_simpleitk_and_ras_flip():
    image = as_image(smooth_volume((8, 9, 10)))
    grid = Grid.of(image)
    d, h, w = 3, 5, 7
    expected = image.TransformContinuousIndexToPhysicalPoint((w, h, d))
    got = grid.voxel_to_physical() @ np.array([d, h, w, 1.0])
    np.testing.assert_allclose(got[:3], expected, atol=1e-9)
    np.testing.assert_allclose(lps_to_ras([1.0, 2.0, 3.0]), [-1.0, -2.0, 3.0])
    assert np.allclose(LPS_TO_RAS @ LPS_TO_RAS, np.eye(3))
