"""The one place that defines axes, coordinates and field directions.

Every other module of ``gvsl`` (and the Slicer module) imports from here instead of
re-deriving a convention.

Axis order
    Volumes are torch tensors of shape ``(N, C, D, H, W)``. ``D, H, W`` are the axes of
    ``SimpleITK.GetArrayFromImage``, i.e. ITK index ``(k, j, i)``: ``W`` is ITK's first
    (x, fastest) index. A *voxel coordinate* in this package is always a vector in
    tensor order ``(d, h, w)`` measured in voxels of the grid it lives on, with voxel
    centres at integer positions.

Physical space
    Files and SimpleITK use LPS millimetres (ITK). 3D Slicer uses RAS millimetres.
    ``LPS_TO_RAS`` converts between them (it is its own inverse). The geometry of a grid
    is a :class:`Grid`: ITK origin, spacing, direction and size.

Displacement fields and the way transforms map
    All transforms here follow ITK's *resampling* convention: they map a point of the
    **fixed** (reference) space to the point of the **moving** space whose intensity is
    pulled back. ``warped(p) = moving(T(p))``.

    * ``flow`` (N, 3, D, H, W): displacement in voxels of the fixed working grid, channel
      order ``(d, h, w)``: ``T(p) = p + flow(p)`` in voxel coordinates.
    * ``affine`` (N, 3, 4): ``[L | t]`` acting on voxel coordinates centred on the grid
      centre ``c = (size - 1) / 2``: ``T(p) = L (p - c) + t + c``.
    * Exported fields (``displacement.nii.gz``) hold LPS millimetre vectors on the fixed
      image's grid: ``T(x) = x + u(x)``, x in LPS mm. Slicer shows them as the transform
      "from parent" (its resampling direction), so a moving volume placed under them is
      aligned to the fixed one.

Sampling
    ``grid_sample`` always runs with ``align_corners=True`` and coordinates normalised
    with ``size - 1``: voxel ``0`` maps to ``-1`` and voxel ``size-1`` to ``+1``, so no
    half-voxel shift is introduced (the official code mixed the two conventions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

from .sampling import grid_sample_parallel

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4X4 = np.diag([-1.0, -1.0, 1.0, 1.0])  # on homogeneous points and 4x4 matrices


@dataclass(frozen=True)
class Grid:
    """Geometry of an ITK image: ``size`` and ``spacing`` in ITK order (i, j, k)."""

    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]  # row-major 3x3, ITK order
    size: Tuple[int, int, int]

    @staticmethod
    def of(image) -> "Grid":
        """Geometry of a SimpleITK image."""
        return Grid(tuple(image.GetOrigin()), tuple(image.GetSpacing()),
                    tuple(image.GetDirection()), tuple(int(s) for s in image.GetSize()))

    def apply_to(self, image):
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Tensor shape ``(D, H, W)`` of an image on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def voxel_to_physical(self) -> np.ndarray:
        """4x4 matrix: homogeneous voxel coordinate ``(d, h, w, 1)`` -> LPS mm."""
        itk_from_tensor = np.zeros((3, 3))
        itk_from_tensor[0, 2] = itk_from_tensor[1, 1] = itk_from_tensor[2, 0] = 1.0
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing) @ itk_from_tensor
        m[:3, 3] = self.origin
        return m

    def physical_to_voxel(self) -> np.ndarray:
        return np.linalg.inv(self.voxel_to_physical())

    def physical_points(self, d_start: int = 0, d_stop: int = None) -> np.ndarray:
        """LPS points (K, 3), float64, of the voxel centres with d in [d_start, d_stop), in
        array (C) order."""
        d_stop = self.shape[0] if d_stop is None else d_stop
        axes = [np.arange(d_start, d_stop, dtype=np.float64)] + [np.arange(s, dtype=np.float64) for s in self.shape[1:]]
        voxels = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        return transform_points(self.voxel_to_physical(), voxels)

    def physical_bounds_center(self) -> np.ndarray:
        """LPS centre of the voxel-centre bounding box."""
        centre_voxel = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return (self.voxel_to_physical() @ np.append(centre_voxel, 1.0))[:3]

    def physical_extent(self) -> np.ndarray:
        """Axis-aligned (LPS) extent in mm of the image's voxel-centre box, plus one voxel."""
        corners = np.array([[d, h, w, 1.0] for d in (-0.5, self.shape[0] - 0.5)
                            for h in (-0.5, self.shape[1] - 0.5)
                            for w in (-0.5, self.shape[2] - 0.5)])
        phys = (self.voxel_to_physical() @ corners.T)[:3]
        return phys.max(axis=1) - phys.min(axis=1)

    def coarsened(self, max_voxels: int) -> "Grid":
        """The same physical box (voxel edges) with at most ``max_voxels`` voxels."""
        n = float(np.prod(self.size))
        if n <= max_voxels:
            return self
        factor = (n / max_voxels) ** (1.0 / 3.0)
        size = tuple(max(2, int(np.ceil(s / factor))) for s in self.size)
        spacing = tuple(sp * s / ns for sp, s, ns in zip(self.spacing, self.size, size))
        # The first voxel centre moves by half the change of spacing.
        shift = 0.5 * (np.asarray(spacing) - np.asarray(self.spacing))
        origin = np.asarray(self.origin) + self.direction_matrix @ shift
        return Grid(tuple(origin.tolist()), spacing, self.direction, size)

    def to_json(self) -> dict:
        return {"origin": list(self.origin), "spacing": list(self.spacing),
                "direction": list(self.direction), "size": list(self.size)}


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 homogeneous matrix to points of shape (..., 3)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def lps_to_ras(points) -> np.ndarray:
    return np.asarray(points, dtype=np.float64) @ LPS_TO_RAS.T


ras_to_lps = lps_to_ras


def working_grid(center_lps: Sequence[float], shape: Sequence[int], spacing_mm: float) -> Grid:
    """An axis-aligned (identity-direction, LPS) isotropic grid of ``shape`` (D, H, W)."""
    size = (int(shape[2]), int(shape[1]), int(shape[0]))
    half = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0 * spacing_mm
    origin = np.asarray(center_lps, dtype=np.float64) - half
    return Grid(tuple(origin.tolist()), (spacing_mm,) * 3, tuple(np.eye(3).ravel().tolist()), size)


# --------------------------------------------------------------------------- tensors


def identity_voxel_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel: (1, 3, D, H, W), channels (d, h, w)."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def voxel_to_normalized(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates (N, 3, D, H, W) of a grid of ``shape`` -> grid_sample's
    (N, D, H, W, 3) grid with (x, y, z) = (w, h, d) order and align_corners=True."""
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=coords.device, dtype=coords.dtype)
    normalized = coords * scale.view(1, 3, 1, 1, 1) - 1.0
    return normalized.permute(0, 2, 3, 4, 1).flip(-1)


def sample_matrix(shape: Sequence[int]) -> np.ndarray:
    """4x4: voxel ``(d, h, w)`` of a volume of ``shape`` -> grid_sample's normalised
    ``(x, y, z)`` (align_corners=True), the matrix form of :func:`voxel_to_normalized`."""
    m = np.zeros((4, 4))
    for row, axis in enumerate((2, 1, 0)):
        m[row, axis] = 2.0 / max(shape[axis] - 1, 1)
        m[row, 3] = -1.0
    m[3, 3] = 1.0
    return m


def sample_at(volume: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear",
              padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``volume`` (N, C, D, H, W) at voxel coordinates ``coords`` (N, 3, d, h, w)
    given in ``volume``'s own voxel grid."""
    grid = voxel_to_normalized(coords.to(volume.dtype), volume.shape[2:])
    return grid_sample_parallel(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp(volume: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """``warped(p) = volume(p + flow(p))`` on the grid of ``flow`` (N, 3, D, H, W)."""
    coords = identity_voxel_grid(flow.shape[2:], flow.device, flow.dtype) + flow
    return sample_at(volume, coords, mode=mode, padding_mode=padding_mode)


def grid_center(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    return (torch.tensor(list(shape), device=device, dtype=dtype) - 1.0) / 2.0


def affine_to_flow(affine: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense displacement (N, 3, D, H, W) of a centred voxel affine (N, 3, 4)."""
    p = identity_voxel_grid(shape, affine.device, affine.dtype)
    c = grid_center(shape, affine.device, affine.dtype).view(1, 3, 1, 1, 1)
    linear, translation = affine[:, :, :3], affine[:, :, 3]
    mapped = torch.einsum("nij,njdhw->nidhw", linear, p - c) + translation.view(-1, 3, 1, 1, 1) + c
    return mapped - p


def compose_affine_then_local(affine: torch.Tensor, local_flow: torch.Tensor) -> torch.Tensor:
    """Fuse ``T(p) = A(p + u(p))`` into one displacement field (N, 3, D, H, W).

    ``u`` (the deformable head's output) lives on the fixed grid, where the head saw
    the affinely aligned moving features; the affine then maps into the moving volume.
    Because A is affine, ``A(p + u) - p = (A(p) - p) + L u`` exactly, with no resampling.
    """
    linear = affine[:, :, :3]
    return affine_to_flow(affine, local_flow.shape[2:]) + torch.einsum("nij,njdhw->nidhw", linear, local_flow)


def voxel_affine_to_matrix(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centred voxel affine (3, 4) -> plain 4x4 voxel-to-voxel matrix."""
    c = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    m = np.eye(4)
    m[:3, :3] = affine[:, :3]
    m[:3, 3] = affine[:, 3] + c - affine[:, :3] @ c
    return m
