"""Refinement of a Match pair on the pair itself (instance optimisation), coarse to fine.

The network gives a start; this module optimises the mapping ``T(x) = A (x + w(x))`` (a
:class:`gvsl.mapping.Mapping`) on the two images, as ANTs, elastix, ConvexAdam and
uniGradICON's instance optimisation do:

1. **Start.** Candidate affines (the network's, the images' foreground centres of mass,
   their bounding-box centres, and scanner coordinates as they are) are each polished for a
   few steps on the coarsest level; the lowest loss wins. Scans of different patients can
   sit hundreds of millimetres apart in scanner coordinates, so a start must not depend
   on the network alone.
2. **Affine.** Twelve parameters, Adam, on the coarse levels.
3. **Deformable.** A stationary velocity field on each level's grid, integrated by scaling
   and squaring (MONAI ``DVF2DDF``), composed with the start's local field (the network's,
   when it helps at that point, else none); similarity + diffusion regularisation, the
   velocity carried from level to level.

Levels are axis-aligned isotropic grids over the fixed image; the finest reaches the
fixed image's own resolution unless that exceeds ``max_voxels`` (then the spacing grows
until it fits): ``DETAIL_MAX_VOXELS`` names the two usual caps, ``full`` (the default: a
1 mm brain or head CT at its own voxel size) and ``fast`` (about 2 mm for a brain).
Similarity: local NCC (``lncc``, same modality) or MIND-SSC (``mind``, modality
independent). All optimisation runs in float32 on the chosen torch device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .conventions import Grid, identity_voxel_grid, sample_at, sample_matrix, voxel_to_normalized, warp
from .mapping import Mapping, interpolation_matrix, lps_to_voxel_flow, voxel_flow_to_lps
from .sampling import SlabVolume, sample_trilinear

SIMILARITIES = ("lncc", "mind")
LNCC_EPSILON_ON_SUMS = 1e-5  # VoxelMorph's NCC: added to the product of window-summed variances
# The finest level's voxel cap by name (CLI --refine-detail, the panel's Detail). On 1 mm
# brains and a 0.96 x 0.96 x 1.5 mm head CT, refining at the scan's own voxel size raised
# Dice by 0.008-0.045 over refining at about 2 mm on 7 of 7 known-transform and two-subject
# pairs and took 26-43 s instead of about 4-5 s on 2 CPU cores, still less than ANTs SyN there
# (43-71 s; benchmarks/registration.py --native, README). Scans of at most 1 M voxels (2 mm
# brains, most CTs) are refined at their own voxel size either way.
DETAIL_MAX_VOXELS = {"full": 1 << 23, "fast": 1 << 20}


@dataclass
class RefineOptions:
    """``iterations``: optimiser steps on the coarsest of ``levels`` levels; each finer level
    gets half of the level above it (the affine stage uses the same counts), so the finest
    level always gets ``iterations >> (levels - 1)`` steps, also where a small image has fewer
    levels (``min_level_size``). 0 turns refinement off."""

    iterations: int = 80
    similarity: str = "lncc"
    time_budget_s: Optional[float] = None
    # Polled before every step like the time budget: True ends refinement where it is
    # (the panel's Stop, through gvsl.stopfile); what was reached is kept.
    stop: Optional[Callable[[], bool]] = None
    # Finest level: at most ~8 M voxels (a 1 mm brain at its own voxel size, a 512^2 x 600 CT
    # of 0.75 x 0.75 x 0.6 mm at 1.9 mm); DETAIL_MAX_VOXELS["fast"] caps it at ~1 M (a brain at about 2 mm).
    max_voxels: int = DETAIL_MAX_VOXELS["full"]
    # The levels cover the fixed image's foreground box plus this margin, not its whole field of
    # view: the similarity only counts foreground voxels, so the air around a head or a body was
    # optimised for nothing; None covers the whole fixed image (the mapping's grid then too).
    foreground_margin_mm: Optional[float] = 12.0
    levels: int = 3
    min_level_size: int = 24  # no level with a side shorter than this
    smoothness: float = 3.0  # weight of the velocity's diffusion regulariser
    lncc_window: int = 7
    learning_rate: float = 0.5  # velocity, in control-grid voxels per step (Adam)
    velocity_smoothing: int = 2  # 3^3 box passes over the velocity parameter (0 = none)
    # A stage stops early once its loss has improved by less than ``tolerance`` over the
    # last ``patience`` steps (0 = always run every step): most pairs converge well before
    # the step count, and the finest level's steps are the expensive ones.
    tolerance: float = 3e-4
    patience: int = 8
    # Adam's first steps move every parameter by about its full learning rate whatever the
    # gradient's size, which undid much of the carried field at the start of every level
    # (the loss rose for ~20 steps); the rate ramps up linearly over these steps instead.
    warmup: int = 10
    # False: ignore the start's affine and local field (start from the geometric candidates
    # alone), to measure what the network's start saves (benchmarks/registration.py).
    network_start: bool = True


@dataclass
class RefineReport:
    start: str = ""
    start_losses: dict = field(default_factory=dict)
    local_start: str = ""
    levels: List[dict] = field(default_factory=list)
    iterations: int = 0
    stopped_by_time_budget: bool = False
    stopped_by_request: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"start": self.start, "start_losses": self.start_losses, "local_start": self.local_start,
                "levels": self.levels, "iterations": self.iterations,
                "stopped_by_time_budget": self.stopped_by_time_budget,
                "stopped_by_request": self.stopped_by_request, "seconds": self.seconds}


class Plateau:
    """Convergence test of one optimisation stage: ``converged(loss)`` is True once the best
    loss has improved by less than ``tolerance`` over the last ``patience`` calls, and never
    within the first ``min_steps`` (the warm-up, when the loss may rise before it falls)."""

    def __init__(self, tolerance: float, patience: int, min_steps: int = 0):
        self.tolerance, self.patience = float(tolerance), max(1, int(patience))
        self.min_steps = max(int(min_steps), self.patience)
        self.history: List[float] = []

    def converged(self, loss: float) -> bool:
        best = min(self.history[-1], loss) if self.history else loss
        self.history.append(best)
        if self.tolerance <= 0 or len(self.history) <= self.min_steps:
            return False
        return self.history[-1 - self.patience] - best < self.tolerance


# ------------------------------------------------------------------------- levels


def axis_spacing(image: sitk.Image) -> np.ndarray:
    """The image's voxel size along each LPS axis (x, y, z), whatever its direction."""
    grid = Grid.of(image)
    return np.abs(grid.direction_matrix) @ np.asarray(grid.spacing, dtype=np.float64)


def grid_over(image: sitk.Image, spacing_xyz) -> Grid:
    """An axis-aligned (LPS) grid of ``spacing_xyz`` covering ``image``, centred on it."""
    grid = Grid.of(image)
    spacing_xyz = np.asarray(spacing_xyz, dtype=np.float64)
    size = np.maximum(2, np.ceil(grid.physical_extent() / spacing_xyz - 1e-6)).astype(int)
    origin = grid.physical_bounds_center() - (size - 1) / 2.0 * spacing_xyz
    return Grid(tuple(origin.tolist()), tuple(spacing_xyz.tolist()), tuple(np.eye(3).ravel().tolist()),
                tuple(int(v) for v in size))


def level_spacings(fixed: sitk.Image, options: RefineOptions, finest_spacing_mm: Optional[float] = None
                   ) -> List[np.ndarray]:
    """Per-axis spacings (x, y, z) of the pyramid, coarsest first. The finest follows the
    fixed image's own voxel size on each axis (an anisotropic CT stays anisotropic: no
    oversampling of thick slices); the isotropic part doubles from level to level, and
    grows where the finest level would exceed ``options.max_voxels``."""
    native = axis_spacing(fixed)
    extent = Grid.of(fixed).physical_extent()
    iso = float(native.min()) if finest_spacing_mm is None else float(finest_spacing_mm)
    while np.prod(np.ceil(extent / np.maximum(native, iso))) > options.max_voxels:
        iso *= 1.05
    spacings = []
    for level in range(options.levels):
        spacing = np.maximum(native, iso * 2 ** level)
        if level > 0 and np.ceil(extent / spacing).min() < options.min_level_size:
            break
        spacings.append(spacing)
    return spacings[::-1]


def nested_control_grid(grid: Grid, spacing_xyz) -> Grid:
    """A coarser grid with the same first and last voxel centres as ``grid`` (so trilinear
    ``F.interpolate(align_corners=True)`` maps one onto the other exactly)."""
    fine = np.asarray(grid.spacing, dtype=np.float64)
    span = (np.asarray(grid.size) - 1) * fine
    size = np.maximum(2, np.ceil(span / np.asarray(spacing_xyz) - 1e-6).astype(int) + 1)
    spacing = np.where(size > 1, span / np.maximum(size - 1, 1), fine)
    return Grid(grid.origin, tuple(spacing.tolist()), grid.direction, tuple(int(v) for v in size))


def volume_on(image: sitk.Image, grid: Grid, device) -> torch.Tensor:
    """``image`` on ``grid`` (1, 1, D, H, W), Gaussian-smoothed first where the grid is
    coarser than the image (no aliasing), zero outside."""
    source = axis_spacing(image)
    target = np.asarray(grid.spacing, dtype=np.float64)
    sigma_xyz = np.sqrt(np.maximum(target ** 2 - source ** 2, 0.0)) / 2.0
    if float(sigma_xyz.max()) > 0.1 * float(source.min()):
        # SmoothingRecursiveGaussian takes sigmas along the image's own index axes.
        sigma_ijk = np.abs(Grid.of(image).direction_matrix).T @ sigma_xyz
        image = sitk.SmoothingRecursiveGaussian(image, np.maximum(sigma_ijk, 1e-3).tolist())
    resampled = sitk.Resample(image, grid.size, sitk.Transform(), sitk.sitkLinear, grid.origin, grid.spacing,
                              grid.direction, 0.0, sitk.sitkFloat32)
    return torch.from_numpy(sitk.GetArrayFromImage(resampled))[None, None].to(device)


def crop_to_foreground(image: sitk.Image, margin_mm: float, worth: float = 0.85) -> sitk.Image:
    """``image`` cropped to the box of its foreground (:func:`foreground_threshold`, as the
    similarity's mask) grown by ``margin_mm``; ``image`` itself when the box would keep more than
    ``worth`` of its voxels or there is no foreground."""
    array = sitk.GetArrayViewFromImage(image)
    foreground = array > foreground_threshold(array)
    if not foreground.any():
        return image
    spacing_kji = np.asarray(image.GetSpacing(), dtype=np.float64)[::-1]
    margin = np.ceil(margin_mm / spacing_kji).astype(int)
    lower, upper = [], []
    for axis in range(3):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        lower.append(max(0, int(present[0]) - margin[axis]))
        upper.append(min(array.shape[axis], int(present[-1]) + 1 + margin[axis]))
    size_kji = np.subtract(upper, lower)
    if np.prod(size_kji) > worth * array.size:
        return image
    return sitk.RegionOfInterest(image, [int(v) for v in size_kji[::-1]], [int(v) for v in lower[::-1]])


def _reduced(image: sitk.Image, spacing_xyz) -> sitk.Image:
    """``image`` on an axis-aligned grid of ``spacing_xyz`` (smoothed first), if that
    holds under half its voxels; else ``image`` itself."""
    grid = Grid.of(image)
    target = grid_over(image, spacing_xyz)
    if np.prod(target.size) * 2 > np.prod(grid.size):
        return image
    array = volume_on(image, target, "cpu")[0, 0].numpy()
    return target.apply_to(sitk.GetImageFromArray(array))


# --------------------------------------------------------------------- similarity


def _running_sum(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """``volume.cumsum(axis)``. Along the outermost spatial axis of a large volume, one in-place
    add per slice: torch's cumsum took about twice as long there as along the other axes
    (2.0 against 0.8-1.2 ms on a 3 x 90 x 108 x 90 volume, 2-core CPU, measured), the slice
    adds 1.1 ms; a small volume keeps cumsum, whose call costs less than the loop's. (Inside
    :class:`_BoxMean`'s forward the input still says ``requires_grad``, but nothing is recorded.)"""
    if axis != 2 or volume.numel() < (1 << 20) or (volume.requires_grad and torch.is_grad_enabled()):
        return volume.cumsum(axis)
    sums = volume.clone()
    previous = sums.select(axis, 0)
    for i in range(1, sums.shape[axis]):
        current = sums.select(axis, i)
        current.add_(previous)
        previous = current
    return sums


def _box_sum_along(volume: torch.Tensor, axis: int, window: int, full: bool) -> torch.Tensor:
    """Sums over ``window`` neighbours along ``axis`` by running sums: only where the window fits
    (the axis shrinks by ``window - 1``), or ``full`` (zero outside, the axis grows by ``window - 1``:
    the adjoint of the first). Written into one output, without padding, which costs as much as
    the sums themselves."""
    n = volume.shape[axis]
    if full and window > n:  # rare (a level thinner than the window): pad, then the valid sums
        pads = [0] * 6
        pads[2 * (4 - axis)] = pads[2 * (4 - axis) + 1] = window - 1
        return _box_sum_along(F.pad(volume, pads), axis, window, full=False)
    if window > n:
        raise ValueError(f"a {window}-voxel window does not fit a {n}-voxel axis")
    sums = _running_sum(volume, axis)
    size = n + window - 1 if full else n - window + 1
    out = sums.new_empty(*sums.shape[:axis], size, *sums.shape[axis + 1:])
    inner = n - window  # outputs that are a difference of two running sums
    if full:
        out.narrow(axis, 0, window).copy_(sums.narrow(axis, 0, window))
        torch.sub(sums.narrow(axis, window, inner), sums.narrow(axis, 0, inner), out=out.narrow(axis, window, inner))
        tail = sums.narrow(axis, n - 1, 1)
        torch.sub(tail, sums.narrow(axis, inner, window - 1), out=out.narrow(axis, n, window - 1))
    else:
        out.narrow(axis, 0, 1).copy_(sums.narrow(axis, window - 1, 1))
        torch.sub(sums.narrow(axis, window, inner), sums.narrow(axis, 0, inner), out=out.narrow(axis, 1, inner))
    return out


def _box_mean_valid(volume: torch.Tensor, window: int, full: bool = False) -> torch.Tensor:
    """Mean over ``window``^3 boxes where the box fits (each side shrinks by ``window - 1``),
    by running sums: the same cost for any window; on the CPU several times faster than
    MONAI's convolution-based LNCC filter (measured). ``full``: the zero-padded adjoint."""
    out = volume
    for axis in (2, 3, 4):
        out = _box_sum_along(out, axis, window, full)
    return out / float(window ** 3)


class _BoxMean(torch.autograd.Function):
    """The box mean with its adjoint as the backward pass: the gradient of a box mean is the
    box mean of the zero-padded gradient. Autograd through the running sums instead spent a
    third of a refinement step re-materialising full-size zero tensors for every ``narrow``
    and flipping for every ``cumsum`` (profiled)."""

    @staticmethod
    def forward(ctx, volume, window):
        ctx.window = window
        return _box_mean_valid(volume, window)

    @staticmethod
    def backward(ctx, grad_output):
        return _box_mean_valid(grad_output, ctx.window, full=True), None


def box_filter(volume: torch.Tensor, window: int, same_size: bool = False) -> torch.Tensor:
    """Mean over ``window``^3 boxes of (N, C, D, H, W). By default only where the box fits
    (each side shrinks by ``window - 1``), so nothing is padded and the backward pass stays
    cheap; ``same_size`` pads by replication first."""
    if same_size:
        half = window // 2
        volume = F.pad(volume, [half, half] * 3, mode="replicate")
    if volume.requires_grad:
        return _BoxMean.apply(volume, window)
    return _box_mean_valid(volume, window)


def crop_border(volume: torch.Tensor, width: int) -> torch.Tensor:
    return volume[..., width:-width, width:-width, width:-width] if width else volume


class LocalNCC:
    """1 - squared local NCC over ``window``^3 boxes (VoxelMorph's LNCC), averaged inside
    a mask (on the voxels where a whole box fits); the fixed image's local statistics are
    computed once."""

    def __init__(self, fixed: torch.Tensor, window: int, mask: torch.Tensor, epsilon: Optional[float] = None):
        # epsilon keeps exactly flat regions (air) at NCC 0. The default is VoxelMorph's 1e-5,
        # which it adds to the product of the variances summed over the window: on these
        # window means it is 1e-5 / window^6. A plain 1e-5 here (before) was 10^5 times
        # larger: it flattened the NCC wherever the local standard deviation was below about
        # 0.06 of the intensity range (inside white matter, soft tissue), which cost 0.01-0.02
        # Dice on the benchmark pairs (README, registration benchmark).
        self.window = window
        self.epsilon = LNCC_EPSILON_ON_SUMS / float(window) ** 6 if epsilon is None else float(epsilon)
        self.mask = crop_border(mask, window // 2)
        # Both images are centred on the fixed image's mean (NCC does not change): the box
        # sums come from float32 running sums along whole axes, whose rounding grows with the
        # values summed. Uncentred, flat windows late along every axis of a 181 x 217 x 181
        # level got a squared NCC of 0.11 on average (0 exactly; up to 0.51), which so small
        # an epsilon no longer hides; centred, 0.001 (up to 0.02).
        self.offset = float(fixed.mean())
        self.fixed = fixed - self.offset
        self.mean_fixed = box_filter(self.fixed, window)
        self.var_fixed = (box_filter(self.fixed * self.fixed, window) - self.mean_fixed ** 2).clamp_min(0)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        warped = warped - self.offset
        # One box filter over the three stacked channels: fewer passes than three filters.
        sums = box_filter(torch.cat([warped, warped * self.fixed, warped * warped], dim=1), self.window)
        mean_w, mean_wf, mean_ww = sums.split(warped.shape[1], dim=1)
        cross = mean_wf - mean_w * self.mean_fixed
        var_w = (mean_ww - mean_w ** 2).clamp_min(0)
        ncc2 = cross * cross / (var_w * self.var_fixed + self.epsilon)
        return 1.0 - (ncc2 * self.mask).sum() / self.mask.sum().clamp_min(1.0)


def mind_ssc(volume: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (N, 12, D, H, W) of (N, 1, D, H, W) (Heinrich et al., MICCAI
    2013): patch distances between the 12 pairs of the six-neighbourhood at ``dilation``,
    exp(-d / variance), normalised per voxel. Modality independent."""
    d = dilation
    six = [(d, 0, 0), (-d, 0, 0), (0, d, 0), (0, -d, 0), (0, 0, d), (0, 0, -d)]
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)
             if sum((a - b) ** 2 for a, b in zip(six[i], six[j])) == 2 * d * d]
    padded = F.pad(volume, [d] * 6, mode="replicate")
    size = volume.shape[2:]

    def shifted(offset):
        z, y, x = (d + o for o in offset)
        return padded[:, :, z:z + size[0], y:y + size[1], x:x + size[2]]

    views = [shifted(o) for o in six]
    distances = torch.cat([box_filter((views[i] - views[j]) ** 2, 2 * radius + 1, same_size=True)
                           for i, j in pairs], dim=1)
    distances = distances - distances.min(dim=1, keepdim=True).values
    variance = distances.mean(dim=1, keepdim=True)
    mean_variance = float(variance.mean())
    variance = variance.clamp(min=mean_variance * 1e-3 + 1e-8, max=mean_variance * 1e3 + 1e-8)
    descriptor = torch.exp(-distances / variance)
    return descriptor / descriptor.max(dim=1, keepdim=True).values


class Similarity:
    """Loss between the fixed level volume and the moving one sampled at given voxels."""

    def __init__(self, kind: str, fixed: torch.Tensor, moving: torch.Tensor, window: int):
        if kind not in SIMILARITIES:
            raise ValueError(f"unknown similarity {kind!r}; choose one of {', '.join(SIMILARITIES)}")
        self.kind = kind
        self.mask = _foreground(fixed, window)
        if kind == "mind":
            self.fixed, self.moving = mind_ssc(fixed), mind_ssc(moving)
        else:
            self.fixed, self.moving = fixed, moving
            self.lncc = LocalNCC(fixed, window, self.mask)
        self.moving_slab = SlabVolume(self.moving, "zeros")  # laid out once, sampled every step

    def __call__(self, grid: torch.Tensor) -> torch.Tensor:
        """``grid`` (1, D, H, W, 3): grid_sample coordinates (x, y, z, normalised,
        align_corners=True) in the moving level volume of each fixed level voxel."""
        warped = sample_trilinear(self.moving_slab, grid)
        if self.kind == "mind":
            per_voxel = ((warped - self.fixed) ** 2).mean(dim=1, keepdim=True)
            return (per_voxel * self.mask).sum() / self.mask.sum()
        return self.lncc(warped)


def foreground_threshold(volume) -> float:
    """The intensity above which a normalised volume (tensor or array) has structure: 5 % of its
    99th percentile (of a ~200 k voxel sample)."""
    flat = volume.reshape(-1)
    sample = flat[:: max(1, flat.shape[0] // 200_000)]
    if not isinstance(sample, torch.Tensor):
        sample = torch.from_numpy(np.array(sample, dtype=np.float32))
    return 0.05 * float(torch.quantile(sample.float(), 0.99))


def _foreground(volume: torch.Tensor, window: int) -> torch.Tensor:
    """Where the fixed image has structure (above :func:`foreground_threshold`), dilated."""
    mask = (volume > foreground_threshold(volume)).float()
    mask = dilate_box(mask, window)
    return mask if mask.sum() > 0 else torch.ones_like(volume)


def dilate_box(mask: torch.Tensor, window: int) -> torch.Tensor:
    """``F.max_pool3d(mask, window, stride=1, padding=window // 2)`` of a 0/1 mask (N, C, D, H, W):
    where the zero-padded box mean is above zero, by running sums (the CPU's 3-D max pool took
    0.2 s on a 2 mm brain; a box mean costs the same for any window). Half of the smallest
    non-zero mean separates the two, far above float32's rounding of the sums."""
    half = window // 2
    means = _box_mean_valid(F.pad(mask, [half] * 6), window)
    return (means > 0.5 / window ** 3).to(mask.dtype)


# ------------------------------------------------------------------------- affine


def _centre_of_mass(volume: torch.Tensor, grid: Grid) -> np.ndarray:
    """LPS centre of mass of the foreground (voxels above 5 % of the maximum)."""
    weights = volume[0, 0].double()
    weights = weights * (weights > 0.05 * float(weights.max()))
    total = float(weights.sum())
    if total <= 0:
        return grid.physical_bounds_center()
    index = identity_voxel_grid(volume.shape[2:], dtype=torch.float64)[0]
    voxel = (index * weights).reshape(3, -1).sum(1).numpy() / total
    return grid.voxel_to_physical()[:3, :3] @ voxel + grid.voxel_to_physical()[:3, 3]


def _translation(vector) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = vector
    return m


def _affine_matrix(base: torch.Tensor, linear_delta: torch.Tensor, translation: torch.Tensor,
                   centre: torch.Tensor) -> torch.Tensor:
    """``base @ D`` with ``D(x) = (I + linear_delta)(x - c) + c + translation`` (4x4)."""
    linear = torch.eye(3, dtype=base.dtype) + linear_delta
    top = torch.cat([linear, (centre - linear @ centre + translation)[:, None]], 1)
    return base @ torch.cat([top, torch.eye(4, dtype=base.dtype)[3:]], 0)


class _Level:
    """One pyramid level: fixed and moving volumes on axis-aligned grids of one spacing,
    the similarity, and the coarser control grid its velocity field lives on."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, spacing_xyz, control_spacing_xyz,
                 options: RefineOptions, device):
        self.grid = grid_over(fixed, spacing_xyz)
        self.moving_grid = grid_over(moving, spacing_xyz)
        self.control = nested_control_grid(self.grid, control_spacing_xyz)
        self.fixed_volume = volume_on(fixed, self.grid, device)
        self.moving_volume = volume_on(moving, self.moving_grid, device)
        self.similarity = Similarity(options.similarity, self.fixed_volume, self.moving_volume, options.lncc_window)
        # voxel indices (1, D, H, W, 3 = d, h, w), channels last to feed grid_sample directly
        self.index = identity_voxel_grid(self.grid.shape, device).permute(0, 2, 3, 4, 1).contiguous()
        self.moving_voxel_to_sample = torch.from_numpy(sample_matrix(self.moving_grid.shape))
        self.device = device
        # control voxels -> level voxels, per tensor channel (d, h, w)
        ratio = np.asarray(self.control.spacing) / np.asarray(self.grid.spacing)
        self.control_to_level = torch.tensor(ratio[::-1].copy(), dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
        self.upsampling = upsampling_matrices(self.control.shape, self.grid.shape, device)

    def _sample_matrix(self, affine: torch.Tensor) -> torch.Tensor:
        """4x4 float32: fixed level voxel (d, h, w) -> grid_sample (x, y, z) in the moving level volume."""
        to_fixed = torch.from_numpy(self.grid.voxel_to_physical())
        to_moving = torch.from_numpy(self.moving_grid.physical_to_voxel())
        return (self.moving_voxel_to_sample @ to_moving @ affine @ to_fixed).float().to(self.device)

    def coords_for(self, affine: torch.Tensor, local_voxels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """grid_sample coordinates (1, D, H, W, 3) in the moving level volume of every
        fixed level voxel under ``affine`` (4x4 LPS, torch float64) and a local
        displacement in fixed level voxels (1, 3, D, H, W)."""
        m = self._sample_matrix(affine)
        p = self.index if local_voxels is None else self.index + local_voxels.permute(0, 2, 3, 4, 1)
        return p @ m[:3, :3].T + m[:3, 3]

    def coords_for_control(self, affine: torch.Tensor, affine_coords: torch.Tensor,
                           control_displacement: torch.Tensor) -> torch.Tensor:
        """``coords_for(affine, self.upsample(control_displacement))`` with less work at full
        resolution: trilinear upsampling commutes with a linear map of the channels, so the
        3x3 part of the sample matrix (and the control-to-level scale) is applied on the control
        grid, and the level only sees one upsample and one add to ``affine_coords``
        (``coords_for(affine)``, computed once per level)."""
        m = self._sample_matrix(affine)
        mixing = m[:3, :3] * self.control_to_level.view(1, 3)
        mapped = torch.einsum("ij,njdhw->nidhw", mixing, control_displacement)
        up = upsample_separable(mapped, self.upsampling)
        return affine_coords + up.permute(0, 2, 3, 4, 1)

    def upsample(self, control_displacement: torch.Tensor) -> torch.Tensor:
        """A displacement in control voxels -> level voxels on the level grid."""
        return upsample_separable(control_displacement, self.upsampling) * self.control_to_level


def upsampling_matrices(source_shape, target_shape, device) -> List[torch.Tensor]:
    """Per axis (d, h, w), the (target, source) float32 matrix of trilinear upsampling with
    ``align_corners=True`` (first and last samples coincide, as on a nested control grid)."""
    matrices = []
    for n_source, n_target in zip(source_shape, target_shape):
        coords = torch.arange(n_target, dtype=torch.float64) * ((n_source - 1) / max(n_target - 1, 1))
        matrices.append(interpolation_matrix(coords, n_source).float().to(device))
    return matrices


def upsample_separable(volume: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``F.interpolate(volume, size, mode="trilinear", align_corners=True)`` of (N, C, d, h, w)
    as three matrix products (:func:`upsampling_matrices`), equal up to float rounding. On the
    CPU ``upsample_trilinear3d``'s backward took 7 ms a refinement step on a 2 mm brain; the
    products' forward and backward together take about a third of the interpolation's."""
    along_d, along_h, along_w = matrices
    out = torch.matmul(along_h, volume @ along_w.T)  # (N, C, d, H, W)
    n, c, d, height, width = out.shape
    return (along_d @ out.reshape(n * c, d, height * width)).reshape(n, c, along_d.shape[0], height, width)


class WarmAdam:
    """Adam (torch's own update, ``torch.optim.adam.adam``) over ``(tensor, learning rate)``
    pairs, each rate ramped up linearly over the first ``warmup`` steps (the schedule of
    ``LambdaLR(lambda step: min(1, (step + 1) / warmup))``).

    Not ``torch.optim.Adam``: its ``step`` imports ``torch._dynamo`` (824 modules, 1.2 s) the
    first time in a process, and every Match pair runs in a fresh process (measured: the first
    refinement stage took 1.5 s instead of 0.45 s)."""

    def __init__(self, groups: Sequence[Tuple[torch.Tensor, float]], warmup: int = 0,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.groups = [(tensor, float(rate)) for tensor, rate in groups]
        self.warmup, self.betas, self.eps = max(1, warmup), betas, eps
        self.exp_avg = [torch.zeros_like(t) for t, _ in self.groups]
        self.exp_avg_sq = [torch.zeros_like(t) for t, _ in self.groups]
        self.steps = [torch.tensor(0.0) for _ in self.groups]
        self.done = 0

    def zero_grad(self):
        for tensor, _ in self.groups:
            tensor.grad = None

    @torch.no_grad()
    def step(self):
        from torch.optim.adam import adam
        factor = min(1.0, (self.done + 1) / self.warmup)
        for k, (tensor, rate) in enumerate(self.groups):
            if tensor.grad is None:
                continue
            adam([tensor], [tensor.grad], [self.exp_avg[k]], [self.exp_avg_sq[k]], [], [self.steps[k]],
                 amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=rate * factor, weight_decay=0.0,
                 eps=self.eps, maximize=False)
        self.done += 1


def optimise_affine(level: _Level, affine: np.ndarray, steps: int, deadline: Callable[[], bool],
                    plateau: Optional[Plateau] = None, warmup: int = 0) -> Tuple[np.ndarray, float, int]:
    """Adam on 12 affine parameters around the fixed level's centre; returns the best
    (4x4, loss) seen and the number of steps taken."""
    base = torch.from_numpy(affine)
    centre = torch.from_numpy(level.grid.physical_bounds_center())
    linear_delta = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    translation = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimiser = WarmAdam([(linear_delta, 0.01), (translation, 0.5 * float(min(level.grid.spacing)))], warmup)
    best = (float("inf"), affine)
    done = 0
    while True:
        matrix = _affine_matrix(base, linear_delta, translation, centre)
        loss = level.similarity(level.coords_for(matrix))
        value = float(loss.detach())
        if value < best[0]:
            best = (value, matrix.detach().numpy().copy())
        if done == steps or deadline() or (plateau is not None and plateau.converged(value)):
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        done += 1
    return best[1], best[0], done


# --------------------------------------------------------------------- deformable


def integrate_velocity(velocity: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity field (N, 3, D, H, W) in voxels:
    the displacement of its exponential. Same result as MONAI's ``DVF2DDF`` with border
    padding (tested); faster on the CPU because the steps run in grid_sample's own
    normalised coordinates, with one identity grid, instead of rebuilding it per step, and
    sample through :func:`gvsl.sampling.sample_trilinear` (the 2-D kernel)."""
    shape = velocity.shape[2:]
    to_normalized = torch.tensor([2.0 / max(n - 1, 1) for n in shape], dtype=velocity.dtype,
                                 device=velocity.device).view(1, 3, 1, 1, 1)
    identity = voxel_to_normalized(identity_voxel_grid(shape, velocity.device, velocity.dtype), shape)
    displacement = velocity * to_normalized / (2 ** steps)  # (N, 3 = d, h, w) normalised
    for _ in range(steps):
        grid = identity + displacement.permute(0, 2, 3, 4, 1).flip(-1)
        displacement = displacement + sample_trilinear(displacement, grid, "border")
    return displacement / to_normalized


def squaring_steps(velocity: torch.Tensor, first_step_voxels: float = 0.5, at_least: int = 2,
                   at_most: int = 8) -> int:
    """Scaling-and-squaring steps for ``velocity`` (voxels): the fewest that bring its
    largest vector to ``first_step_voxels`` before the first squaring (Arsigny et al. 2006;
    DARTEL's rule), where the small-deformation exponential is accurate and cannot fold.
    A fixed 6 spent half of a finest-level step integrating fields that needed 3 or 4
    (profiled)."""
    # The squared sum, not Tensor.norm(dim=1): the channel-axis norm took 12 ms on a finest
    # control grid, 8 % of a step (profiled), the squared sum 0.2 ms.
    largest = float((velocity.detach() ** 2).sum(dim=1).amax()) ** 0.5 if velocity.numel() else 0.0
    if largest <= first_step_voxels:
        return at_least
    return int(min(at_most, max(at_least, np.ceil(np.log2(largest / first_step_voxels)))))


def _resample_voxel_field(field_voxels: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A displacement in voxels of ``source`` -> the same physical field in voxels of
    ``target``, sampled on ``target``."""
    millimetres = voxel_flow_to_lps(field_voxels, source)
    index = identity_voxel_grid(target.shape, field_voxels.device)
    to_source = torch.from_numpy(source.physical_to_voxel() @ target.voxel_to_physical()).float().to(index)
    coords = torch.einsum("ij,njdhw->nidhw", to_source[:3, :3], index) + to_source[:3, 3].view(1, 3, 1, 1, 1)
    return lps_to_voxel_flow(sample_at(millimetres, coords, padding_mode="border"), target)


def _start_local_voxels(start: Mapping, grid: Grid, device) -> Optional[torch.Tensor]:
    if start.local is None:
        return None
    local_voxels = lps_to_voxel_flow(start.local, start.grid)
    return _resample_voxel_field(local_voxels, start.grid, grid).to(device)


def _compose(displacement: torch.Tensor, start_local: Optional[torch.Tensor]) -> torch.Tensor:
    """Local displacement (voxels) of ``p -> q + w0(q)`` with ``q = p + s(p)``."""
    if start_local is None:
        return displacement
    return displacement + warp(start_local, displacement, padding_mode="border")


def smooth_velocity(parameter: torch.Tensor, passes: int) -> torch.Tensor:
    """The velocity seen by the integration: the optimised parameter after ``passes`` 3^3
    box filters (about a Gaussian of sigma 0.8 * sqrt(passes) control voxels). Adam moves
    every parameter by about its learning rate, even where the gradient is only the
    regulariser's (air, outside the mask), which left grid-scale noise in the field and its
    Jacobian; filtering the parameter keeps the field smooth whatever the optimiser does
    (as ConvexAdam smooths its displacement parameter)."""
    for _ in range(passes):
        parameter = box_filter(parameter, 3, same_size=True)
    return parameter


def _diffusion(velocity: torch.Tensor, spacing_dhw: torch.Tensor) -> torch.Tensor:
    """Mean squared physical gradient of a velocity (voxels of a grid with ``spacing_dhw``
    in mm per tensor axis), in (mm / mm)^2: independent of the grid's resolution."""
    millimetres = velocity * spacing_dhw.view(1, 3, 1, 1, 1)
    total = 0.0
    for k, axis in enumerate((2, 3, 4)):
        total = total + (millimetres.diff(dim=axis) ** 2).mean() / float(spacing_dhw[k]) ** 2
    return total / 3.0


def refine_mapping(fixed: sitk.Image, moving: sitk.Image, start: Mapping, options: RefineOptions,
                   device=torch.device("cpu"), progress: Optional[Callable[[str, float], None]] = None,
                   finest_spacing_mm: Optional[float] = None) -> Tuple[Mapping, RefineReport]:
    """Optimise ``start`` on the pair. ``fixed`` and ``moving`` are intensity-normalised
    images in [0, 1] (zero = background). Returns the refined mapping and a report."""
    say = progress or (lambda stage, fraction: None)
    t_start = time.perf_counter()
    report = RefineReport()
    budget = options.time_budget_s

    def out_of_time() -> bool:
        if report.stopped_by_request or (options.stop is not None and options.stop()):
            report.stopped_by_request = True
            return True
        if budget is not None and time.perf_counter() - t_start > budget:
            report.stopped_by_time_budget = True
            return True
        return False

    spacings = level_spacings(fixed, options, finest_spacing_mm)
    # Levels dropped for size are the coarsest ones: the finest keeps its share of the steps.
    # Counted from the coarsest, a 2 mm brain (two levels) got twice that: 40 full-resolution
    # steps, three quarters of its refinement time, for a Dice at most 0.005 higher
    # (benchmarks/results/registration_cpu_issue19c.txt against issue19d.txt).
    dropped = max(0, options.levels - len(spacings))

    def steps_on(k: int) -> int:
        return max(5, options.iterations >> (dropped + k))

    # A fine scan (a 512^2 x 600 CT) is smoothed and reduced once to the finest level's
    # spacing; every level is then built from that, not from the full volume.
    fixed = _reduced(fixed, spacings[-1])
    moving = _reduced(moving, spacings[-1])
    fixed_whole = fixed
    if options.foreground_margin_mm is not None:
        fixed = crop_to_foreground(fixed, options.foreground_margin_mm)
    # Each level's velocity lives at the next coarser level's spacing (half resolution).
    controls = [spacings[0] * 2.0] + spacings[:-1]
    levels: List[_Level] = []

    def level(k: int) -> _Level:
        while len(levels) <= k:
            i = len(levels)
            levels.append(_Level(fixed, moving, spacings[i], controls[i], options, device))
        return levels[k]

    # 1. Start: candidates polished briefly on the coarsest level.
    coarse = level(0)
    fixed_com = _centre_of_mass(coarse.fixed_volume.cpu(), coarse.grid)
    moving_com = _centre_of_mass(coarse.moving_volume.cpu(), coarse.moving_grid)
    candidates = {
        **({"network": start.affine} if options.network_start else {}),
        "centre of mass": _translation(moving_com - fixed_com),
        "image centres": _translation(Grid.of(moving).physical_bounds_center()
                                      - Grid.of(fixed_whole).physical_bounds_center()),
        "scanner": np.eye(4),
    }
    polish = max(5, options.iterations // 8)
    polished = {}
    t_stage = time.perf_counter()
    for name, matrix in candidates.items():
        if any(np.allclose(matrix, candidates[other], atol=1e-6) for other in polished):
            continue  # the same start twice (e.g. images already centred in scanner space)
        polished[name] = optimise_affine(coarse, matrix, polish, out_of_time)
        report.iterations += polished[name][2]
        report.start_losses[name] = polished[name][1]
    report.start = min(polished, key=lambda n: polished[n][1])
    report.levels.append({"stage": "start", "candidates": len(polished), "steps_each": polish,
                          "seconds": time.perf_counter() - t_stage})
    affine = polished[report.start][0]
    say("refine affine", 0.1)

    # 2. Affine on the coarse levels (the finest adds little for its cost).
    for k in range(max(1, len(spacings) - 1)):
        steps = steps_on(k)
        t_stage = time.perf_counter()
        affine, loss, done = optimise_affine(level(k), affine, steps, out_of_time,
                                             Plateau(options.tolerance, options.patience, options.warmup + options.patience),
                                             options.warmup)
        report.iterations += done
        report.levels.append({"stage": "affine", "spacing_mm": list(level(k).grid.spacing),
                              "shape_dhw": list(level(k).grid.shape), "steps": done, "loss": loss,
                              "seconds": time.perf_counter() - t_stage})
    affine_t = torch.from_numpy(affine)

    # The network's local field is kept only if it starts better than none.
    first = level(0)
    start_local = _start_local_voxels(start, first.grid, device) if options.network_start else None
    with torch.no_grad():
        loss_without = float(first.similarity(first.coords_for(affine_t)))
        loss_with = (float(first.similarity(first.coords_for(affine_t, start_local)))
                     if start_local is not None else float("inf"))
    use_start_local = loss_with < loss_without
    report.local_start = "network" if use_start_local else "none"
    say("refine deformable", 0.3)

    # 3. Deformable: stationary velocity field on each level's control grid, coarse to fine.
    velocity, previous = None, None
    for k in range(len(spacings)):
        t_stage = time.perf_counter()
        lvl = level(k)
        w0 = None if not use_start_local else (start_local if k == 0 else _start_local_voxels(start, lvl.grid, device))
        if velocity is None:
            velocity = torch.zeros(1, 3, *lvl.control.shape, device=device)
        else:
            carried = smooth_velocity(velocity.detach(), options.velocity_smoothing)
            velocity = _resample_voxel_field(carried, previous.control, lvl.control)
        velocity.requires_grad_(True)
        spacing_dhw = torch.tensor(lvl.control.spacing[::-1], dtype=torch.float32, device=device)
        optimiser = WarmAdam([(velocity, options.learning_rate)], options.warmup)
        steps = steps_on(k)
        done, loss_value = 0, None  # None, not NaN: metrics.json is strict JSON
        plateau = Plateau(options.tolerance, options.patience, options.warmup + options.patience)
        affine_coords = lvl.coords_for(affine_t) if w0 is None else None
        for _ in range(steps):
            if out_of_time():
                break
            smooth = smooth_velocity(velocity, options.velocity_smoothing)
            displacement = integrate_velocity(smooth, squaring_steps(smooth))
            if w0 is None:
                coords = lvl.coords_for_control(affine_t, affine_coords, displacement)
            else:
                coords = lvl.coords_for(affine_t, _compose(lvl.upsample(displacement), w0))
            loss_similarity = lvl.similarity(coords)
            loss = loss_similarity + options.smoothness * _diffusion(smooth, spacing_dhw)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            done += 1
            loss_value = float(loss_similarity.detach())
            if plateau.converged(float(loss.detach())):
                break
        report.iterations += done
        report.levels.append({"stage": "deformable", "spacing_mm": list(lvl.grid.spacing),
                              "shape_dhw": list(lvl.grid.shape), "control_shape_dhw": list(lvl.control.shape),
                              "steps": done, "loss": loss_value, "seconds": time.perf_counter() - t_stage})
        previous = lvl
        say("refine deformable", 0.3 + 0.7 * (k + 1) / len(spacings))

    finest = levels[-1]  # w0 is still the start's local field on the finest level's grid
    with torch.no_grad():
        smooth = smooth_velocity(velocity.detach(), options.velocity_smoothing)
        local_voxels = _compose(finest.upsample(integrate_velocity(smooth, squaring_steps(smooth))), w0)
        local = voxel_flow_to_lps(local_voxels, finest.grid).float().cpu()
    report.seconds = time.perf_counter() - t_start
    return Mapping(affine=affine, local=local, grid=finest.grid), report
