"""One representation of a Match pair's answer, and its export onto any grid.

A :class:`Mapping` is ``T(x) = A (x + w(x))``: a fixed-space LPS point ``x`` goes to the
moving-space LPS point ``T(x)`` (ITK's resampling direction, see :mod:`gvsl.conventions`).
``A`` is a 4x4 LPS affine; ``w`` is a local displacement in LPS millimetres, stored densely
on a small grid of its own (the network's working grid or the finest refinement level)
and interpolated trilinearly everywhere else. The network's answer and the refined answer
are both Mappings, so everything downstream (point mapping, displacement field, warped
image, Jacobian, Slicer nodes) has one code path.

Exports run slab by slab in float32 torch: every coordinate change along the way is affine
in the output voxel index, so it is folded into one small float64 matrix per export and
applied to the slab's indices (no per-voxel float64 work, no full-volume point list).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .conventions import Grid, sample_at, sample_matrix
from .sampling import grid_sample_parallel

DEFAULT_SLAB_VOXELS = 1 << 22


@dataclass
class Mapping:
    """``T(x) = A (x + w(x))``, fixed LPS mm -> moving LPS mm.

    affine: (4, 4) float64 LPS matrix ``A``.
    local: (1, 3, D, H, W) float32, LPS mm vectors ``(x, y, z)`` of ``w`` on ``grid``; None
        for a purely affine mapping. Outside ``grid`` the border value is used.
    """

    affine: np.ndarray
    local: Optional[torch.Tensor] = None
    grid: Optional[Grid] = None

    # ---------------------------------------------------------------- points
    def map_points(self, points_lps, affine_only: bool = False) -> np.ndarray:
        """(K, 3) fixed LPS points -> (K, 3) moving LPS points, float64."""
        x = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
        if not affine_only and self.local is not None:
            x = x + self.local_at(x)
        return x @ self.affine[:3, :3].T + self.affine[:3, 3]

    def local_at(self, points_lps: np.ndarray) -> np.ndarray:
        """``w`` at (K, 3) LPS points, float64 (K, 3)."""
        voxels = points_lps @ self.grid.physical_to_voxel()[:3, :3].T + self.grid.physical_to_voxel()[:3, 3]
        coords = torch.from_numpy(voxels.T.reshape(1, 3, -1, 1, 1).astype(np.float32))
        return sample_at(self.local, coords, padding_mode="border").reshape(3, -1).T.double().numpy()

    # ----------------------------------------------------------------- slabs
    def _linear_local(self, linear: np.ndarray) -> torch.Tensor:
        """``linear @ w`` (1, D, H, W, 3, channels last) on the local grid: a 3x3 map of the
        vectors commutes with their interpolation, so it runs on the small grid, not per
        output voxel."""
        m = torch.from_numpy(np.asarray(linear, dtype=np.float32))
        return torch.einsum("ij,njdhw->ndhwi", m, self.local)

    @staticmethod
    def _on_slab(field: torch.Tensor, to_local: np.ndarray, points: "Slab") -> torch.Tensor:
        """``field`` (1, D, H, W, 3) on the local grid, at the voxels of the output slab
        ``points``: (1, d, h, w, 3); ``to_local`` maps output voxels to local-grid voxels."""
        channels_first = field.permute(0, 4, 1, 2, 3).contiguous()
        values = resample_separable(channels_first, to_local, points)
        if values is None:
            coords = points.apply(sample_matrix(field.shape[1:4]) @ to_local)
            values = grid_sample_parallel(channels_first, coords, mode="bilinear", padding_mode="border",
                                   align_corners=True)
        return values.permute(0, 2, 3, 4, 1)

    def displacement_bound(self, grid: Grid) -> float:
        """An upper bound of ``|T(x) - x|`` (mm, any component) on ``grid``: the affine part
        at the grid's corners plus the largest local displacement."""
        corners = np.array([[d, h, w] for d in (0, grid.shape[0] - 1) for h in (0, grid.shape[1] - 1)
                            for w in (0, grid.shape[2] - 1)], dtype=np.float64)
        x = corners @ grid.voxel_to_physical()[:3, :3].T + grid.voxel_to_physical()[:3, 3]
        affine = np.abs(x @ self.affine[:3, :3].T + self.affine[:3, 3] - x).max()
        local = float(self.local.abs().max()) * float(np.abs(self.affine[:3, :3]).sum(1).max()) \
            if self.local is not None else 0.0
        return float(affine + local)

    def displacement_slabs(self, grid: Grid, slab_voxels: int = DEFAULT_SLAB_VOXELS,
                           dtype: torch.dtype = torch.float32) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """``T(x) - x`` on ``grid`` in LPS mm, as (d0, d1, tensor (d1-d0, H, W, 3) of ``dtype``):
        float64 keeps sub-millimetre detail where the displacement is huge (images far apart)."""
        to_phys = grid.voxel_to_physical()
        # (A - I) x for x = M p is affine in p; the local part is L w.
        affine_part = (self.affine - np.eye(4)) @ to_phys
        if self.local is not None:
            to_local = self.grid.physical_to_voxel() @ to_phys
            linear_local = self._linear_local(self.affine[:3, :3])
        for d0, d1, points in slab_points(grid, slab_voxels):
            u = points.apply(affine_part, dtype)
            if self.local is not None:
                u += self._on_slab(linear_local, to_local, points).to(dtype)
            yield d0, d1, u[0]

    def warp_slabs(self, grid: Grid, moving: torch.Tensor, moving_grid: Grid, background: float = 0.0,
                   mode: str = "bilinear", slab_voxels: int = DEFAULT_SLAB_VOXELS
                   ) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """``moving(T(x))`` on ``grid`` as (d0, d1, tensor (d1-d0, H, W)); ``moving`` is
        (1, C, D, H, W) on ``moving_grid``; outside it reads ``background``."""
        to_phys = grid.voxel_to_physical()
        to_sample = sample_matrix(moving.shape[2:]) @ moving_grid.physical_to_voxel()
        affine_part = to_sample @ self.affine @ to_phys
        if self.local is not None:
            to_local = self.grid.physical_to_voxel() @ to_phys
            linear_local = self._linear_local(to_sample[:3, :3] @ self.affine[:3, :3])
        shifted = moving - background if background else moving
        for d0, d1, points in slab_points(grid, slab_voxels):
            coords = points.apply(affine_part)
            if self.local is not None:
                coords += self._on_slab(linear_local, to_local, points)
            values = grid_sample_parallel(shifted, coords, mode=mode, padding_mode="zeros", align_corners=True)
            if background:
                values += background
            yield d0, d1, values[0, 0] if values.shape[1] == 1 else values[0]

    # -------------------------------------------------------------- Jacobian
    def jacobian_on_local_grid(self) -> torch.Tensor:
        """det(dT/dx) (D, H, W) on the local grid: ``det(L) det(I + dw/dx)``."""
        det_l = float(np.linalg.det(self.affine[:3, :3]))
        if self.local is None:
            raise ValueError("a purely affine mapping has the constant Jacobian det(L)")
        return det_l * local_jacobian_determinant(self.local, self.grid)

    def jacobian_slabs(self, grid: Grid, slab_voxels: int = DEFAULT_SLAB_VOXELS
                       ) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """det(dT/dx) on ``grid``, interpolated from the local grid's finite differences."""
        if self.local is None:
            det_l = float(np.linalg.det(self.affine[:3, :3]))
            for d0, d1, _ in slab_points(grid, slab_voxels):
                yield d0, d1, torch.full((d1 - d0, *grid.shape[1:]), det_l)
            return
        det = self.jacobian_on_local_grid()[None, None]
        to_local = self.grid.physical_to_voxel() @ grid.voxel_to_physical()
        for d0, d1, points in slab_points(grid, slab_voxels):
            values = resample_separable(det, to_local, points)
            if values is None:
                values = grid_sample_parallel(det, points.apply(sample_matrix(det.shape[2:]) @ to_local),
                                       mode="bilinear", padding_mode="border", align_corners=True)
            yield d0, d1, values[0, 0]


def local_jacobian_determinant(local: torch.Tensor, grid: Grid) -> torch.Tensor:
    """det(I + dw/dx) (D, H, W) of an LPS-mm field ``local`` (1, 3, D, H, W) on ``grid``,
    central differences in physical space (direction matrix included)."""
    w = local[0].float()
    dw_dp = torch.stack(torch.gradient(w, dim=(1, 2, 3)), dim=-1)  # (3 comps, D, H, W, 3 voxel axes)
    dp_dx = torch.from_numpy(grid.physical_to_voxel()[:3, :3].astype(np.float32))
    jac = torch.einsum("idhwk,kj->dhwij", dw_dp, dp_dx) + torch.eye(3)
    return torch.linalg.det(jac)


class Slab:
    """Output voxels ``d0 <= d < d1`` of a grid (all h, w)."""

    def __init__(self, d0: int, d1: int, height: int, width: int):
        self.d0, self.d1, self.height, self.width = d0, d1, height, width

    def apply(self, matrix: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A 4x4 (float64) affine of the voxel coordinates ``(d, h, w)``, evaluated on the
        slab: (1, d1-d0, H, W, 3) float32, channels last (what grid_sample takes). The map
        is separable, so it is three broadcast adds, not a per-voxel matrix product."""
        m = torch.from_numpy(matrix[:3, :4].astype(np.float64))
        d = torch.arange(self.d0, self.d1, dtype=torch.float64).view(-1, 1, 1, 1) * m[:, 0]
        h = torch.arange(self.height, dtype=torch.float64).view(1, -1, 1, 1) * m[:, 1]
        w = torch.arange(self.width, dtype=torch.float64).view(1, 1, -1, 1) * m[:, 2]
        if dtype == torch.float64:
            return (d + m[:, 3] + h + w)[None]
        # The large per-plane offsets are summed in float64 before the cast to float32.
        return ((d + m[:, 3]).float() + (h.float() + w.float()))[None]


def axis_permutation(matrix: np.ndarray, tolerance: float = 1e-9) -> Optional[Tuple[int, int, int]]:
    """For a 4x4 voxel -> voxel affine whose 3x3 part has one non-zero per row and column
    (grids with the same axes, up to order and flips), ``axes[k]``: the output axis that
    source axis ``k`` depends on; None for any other (oblique) matrix."""
    linear = np.abs(np.asarray(matrix, dtype=np.float64)[:3, :3])
    axes = tuple(int(a) for a in linear.argmax(1))
    if sorted(axes) != [0, 1, 2]:
        return None
    off_axis = linear.copy()
    off_axis[range(3), axes] = 0.0
    return axes if off_axis.max() <= tolerance * max(linear.max(), 1.0) else None


# Up to this many source samples along an axis, the 1-D interpolation runs as a matrix
# product with its (two-banded) weight matrix: a GEMM streams the output once, where gathering
# two neighbours per output sample costs several times more at a 512 x 512 x 600 output.
DENSE_INTERPOLATION_MAX_SIZE = 256


def _interpolation_weights(coords: torch.Tensor, size: int):
    """Border-clamped linear interpolation at float64 positions ``coords`` (K,) on ``size``
    samples: (lower neighbour (K,) long, weight of the upper one (K,) float64)."""
    coords = coords.clamp(0, size - 1)
    low = coords.floor().clamp(max=size - 2)
    return low.long(), coords - low


def interpolation_matrix(coords: torch.Tensor, size: int) -> torch.Tensor:
    """(K, size) float64 matrix of border-clamped linear interpolation at positions ``coords``
    (K,): row k holds the two weights of sample k (a matrix product interpolates, and its
    transpose is the adjoint)."""
    low, weight = _interpolation_weights(coords, size)
    rows = torch.arange(coords.numel())
    weights = torch.zeros(coords.numel(), size, dtype=torch.float64)
    weights.index_put_((rows, low), 1.0 - weight, accumulate=True)
    weights.index_put_((rows, low + 1), weight, accumulate=True)
    return weights


def _linear_along(volume: torch.Tensor, dim: int, coords: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of the contiguous ``volume`` along ``dim`` at float64 positions
    ``coords`` (K,), clamped to the border (grid_sample's ``padding_mode="border"``); the
    result is contiguous."""
    size = volume.shape[dim]
    shape = list(volume.shape)
    shape[dim] = coords.numel()
    if size == 1:
        return volume.expand(shape).contiguous()
    before = int(np.prod(volume.shape[:dim]))
    after = int(np.prod(volume.shape[dim + 1:]))
    if size <= DENSE_INTERPOLATION_MAX_SIZE:
        weights = interpolation_matrix(coords, size).to(volume.dtype)
        if after == 1:
            out = volume.reshape(before, size) @ weights.T
        else:
            out = torch.matmul(weights, volume.reshape(before, size, after))
        return out.reshape(shape)
    low, weight = _interpolation_weights(coords, size)
    weight_shape = [1] * volume.dim()
    weight_shape[dim] = -1
    weight = weight.to(volume.dtype).view(weight_shape)
    return torch.lerp(volume.index_select(dim, low), volume.index_select(dim, low + 1), weight)


def resample_separable(volume: torch.Tensor, to_source: np.ndarray, slab: "Slab") -> Optional[torch.Tensor]:
    """``volume`` (1, C, D, H, W) sampled trilinearly (border padding) at the voxels of
    ``slab``, as three 1-D interpolations, when ``to_source`` (output voxel -> ``volume``
    voxel) keeps the axes (:func:`axis_permutation`); None otherwise. Equal to grid_sample
    up to float rounding, at a fraction of its cost on a large output (3 x 1-D instead of
    8 gathers per point), and exact in float64 coordinates at any output size."""
    axes = axis_permutation(to_source)
    if axes is None:
        return None
    output_ranges = (torch.arange(slab.d0, slab.d1, dtype=torch.float64),
                     torch.arange(slab.height, dtype=torch.float64),
                     torch.arange(slab.width, dtype=torch.float64))
    out = volume
    # The axis that follows the slab's rows goes first: the intermediate stays slab-sized.
    for source_axis in sorted(range(3), key=lambda k: axes[k]):
        output_axis = axes[source_axis]
        coords = output_ranges[output_axis] * float(to_source[source_axis, output_axis]) \
            + float(to_source[source_axis, 3])
        out = _linear_along(out, 2 + source_axis, coords)
    # out's dims follow the source axes; put them in output order (d, h, w).
    order = [0, 1] + [2 + axes.index(output_axis) for output_axis in range(3)]
    return out.permute(order)


def slab_points(grid: Grid, slab_voxels: int = DEFAULT_SLAB_VOXELS) -> Iterator[Tuple[int, int, Slab]]:
    """(d0, d1, :class:`Slab`) covering ``grid`` slab by slab."""
    depth, height, width = grid.shape
    rows = max(1, slab_voxels // max(1, height * width))
    for d0 in range(0, depth, rows):
        d1 = min(depth, d0 + rows)
        yield d0, d1, Slab(d0, d1, height, width)


def voxel_flow_to_lps(flow: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A displacement in voxels of ``grid`` (N, 3, D, H, W), channels (d, h, w) ->
    LPS millimetre vectors (N, 3, D, H, W), channels (x, y, z)."""
    m = torch.from_numpy(grid.voxel_to_physical()[:3, :3].astype(np.float32)).to(flow)
    return torch.einsum("ij,nj...->ni...", m, flow)


def lps_to_voxel_flow(local: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`voxel_flow_to_lps`."""
    m = torch.from_numpy(grid.physical_to_voxel()[:3, :3].astype(np.float32)).to(local)
    return torch.einsum("ij,nj...->ni...", m, local)
