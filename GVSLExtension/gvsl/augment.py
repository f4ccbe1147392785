"""Batched augmentation on the training device, drawn independently per sample.

Appearance (self-restoration damage, the official rates): local pixel shuffling (p=0.8,
5000 blocks of size/20), a Bezier intensity curve (p=0.9) and in-painting (up to 30 boxes
of size/10..size/5 filled with uniform noise, continuing with p=0.95).

Spatial: a random affine in the official ranges (rotation +-pi/9, scale 0.75..1.25,
shear +-pi/18, translation +-10 % of the size) composed with a smooth elastic field
(alpha 0..512, sigma 10..13 voxels, with the official displacement statistics).

Volumes are (N, C, D, H, W) in [0, 1]; axes and fields follow :mod:`gvsl.conventions`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .conventions import compose_affine_then_local, warp
from .network import affine_from_parameters


@dataclass
class AppearanceConfig:
    shuffle_rate: float = 0.8
    shuffle_blocks: int = 5000
    bezier_rate: float = 0.9
    inpaint_max_boxes: int = 30
    inpaint_continue: float = 0.95


@dataclass
class SpatialConfig:
    rotation: float = math.pi / 9
    scale: float = 0.25
    shear: float = math.pi / 18
    translation_fraction: float = 0.1
    elastic_alpha: Tuple[float, float] = (0.0, 512.0)
    elastic_sigma: Tuple[float, float] = (10.0, 13.0)


def _uniform(shape, low, high, generator, device):
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def local_shuffle(x: torch.Tensor, rate: float, blocks: int, generator=None) -> torch.Tensor:
    """Shuffle the voxels inside ``blocks`` random boxes of size/20 per sample (N, 1, D, H, W)."""
    n, _, *shape = x.shape
    box = [max(1, s // 20) for s in shape]
    device = x.device
    out = x.clone()
    apply = torch.rand(n, generator=generator, device=device) < rate
    if not bool(apply.any()):
        return out
    offsets = torch.stack(torch.meshgrid(*[torch.arange(b, device=device) for b in box], indexing="ij"), -1)
    offsets = offsets.reshape(-1, 3)  # (V, 3)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    for i in torch.nonzero(apply).flatten().tolist():
        corner = torch.stack([torch.randint(0, shape[a] - box[a] + 1, (blocks,), generator=generator,
                                            device=device) for a in range(3)], -1)  # (B, 3)
        index = ((corner[:, None, :] + offsets[None]) * strides).sum(-1)  # (B, V)
        flat = out[i, 0].reshape(-1)
        values = flat[index]
        perm = torch.argsort(torch.rand(index.shape, generator=generator, device=device), dim=1)
        flat[index.reshape(-1)] = torch.gather(values, 1, perm).reshape(-1)
    return out


def bezier_intensity(x: torch.Tensor, rate: float, generator=None, samples: int = 1024) -> torch.Tensor:
    """Monotone cubic Bezier intensity remapping through (0,0), two random points, (1,1)."""
    n = x.shape[0]
    device = x.device
    t = torch.linspace(0, 1, samples, device=device)
    basis = torch.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3])  # (4, S)
    control = torch.rand(n, 2, 2, generator=generator, device=device)  # (N, point, xy)
    px = torch.cat([torch.zeros(n, 1, device=device), control[:, :, 0], torch.ones(n, 1, device=device)], 1)
    py = torch.cat([torch.zeros(n, 1, device=device), control[:, :, 1], torch.ones(n, 1, device=device)], 1)
    xs = torch.sort(px @ basis, dim=1).values  # the official sorts x and y independently
    ys = torch.sort(py @ basis, dim=1).values
    flat = x.reshape(n, -1).clamp(0, 1).contiguous()
    idx = torch.searchsorted(xs, flat).clamp(1, samples - 1)
    x0, x1 = torch.gather(xs, 1, idx - 1), torch.gather(xs, 1, idx)
    y0, y1 = torch.gather(ys, 1, idx - 1), torch.gather(ys, 1, idx)
    mapped = y0 + (flat - x0) / (x1 - x0).clamp_min(1e-12) * (y1 - y0)
    apply = (torch.rand(n, 1, generator=generator, device=device) < rate)
    return torch.where(apply, mapped, x.reshape(n, -1)).reshape(x.shape)


def inpaint(x: torch.Tensor, max_boxes: int, continue_rate: float, generator=None) -> torch.Tensor:
    """Fill random boxes (size/10..size/5 per axis) with uniform noise, per sample."""
    n, _, *shape = x.shape
    device = x.device
    keep_going = torch.rand(n, max_boxes, generator=generator, device=device) < continue_rate
    active = torch.cumprod(keep_going.int(), dim=1).bool()  # (N, K): stops at the first failure
    mask = torch.zeros(n, 1, *shape, dtype=torch.bool, device=device)
    coords = [torch.arange(s, device=device) for s in shape]
    lo_hi = []
    for a, s in enumerate(shape):
        low, high = max(1, s // 10), max(2, s // 5)
        size = torch.randint(low, high, (n, max_boxes), generator=generator, device=device)
        start_max = (s - size - 3).clamp_min(4)
        start = (torch.rand(n, max_boxes, generator=generator, device=device) * (start_max - 3)).long() + 3
        start = torch.minimum(start, (s - size).clamp_min(0))
        lo_hi.append((start, start + size))
    for k in range(max_boxes):
        if not bool(active[:, k].any()):
            break
        inside = active[:, k].view(n, 1, 1, 1, 1)
        for a in range(3):
            c = coords[a].view([1, 1] + [-1 if b == a else 1 for b in range(3)])
            lo = lo_hi[a][0][:, k].view(n, 1, 1, 1, 1)
            hi = lo_hi[a][1][:, k].view(n, 1, 1, 1, 1)
            inside = inside & (c >= lo) & (c < hi)
        mask |= inside
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    return torch.where(mask, noise, x)


def damage_appearance(x: torch.Tensor, config: AppearanceConfig = AppearanceConfig(), generator=None):
    """The self-restoration input: shuffling, Bezier curve, in-painting (official order)."""
    x = local_shuffle(x, config.shuffle_rate, config.shuffle_blocks, generator)
    x = bezier_intensity(x, config.bezier_rate, generator)
    return inpaint(x, config.inpaint_max_boxes, config.inpaint_continue, generator)


def _gaussian_smooth(noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, 3, d, h, w) with one sigma per sample."""
    out = []
    for i in range(noise.shape[0]):
        s = float(sigma[i])
        radius = max(1, int(4 * s + 0.5))
        r = torch.arange(-radius, radius + 1, device=noise.device, dtype=noise.dtype)
        k = torch.exp(-0.5 * (r / s) ** 2)
        k = k / k.sum()
        v = noise[i:i + 1].transpose(0, 1)  # (3, 1, d, h, w): channels as batch
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = -1
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            v = F.conv3d(F.pad(v, pad, mode="replicate"), k.view(shape))
        out.append(v.transpose(0, 1))
    return torch.cat(out, 0)


def random_spatial_flow(n: int, shape, config: SpatialConfig = SpatialConfig(), generator=None,
                        device="cpu", coarse_factor: int = 4) -> torch.Tensor:
    """Random affine + elastic displacement (N, 3, D, H, W) in voxels, one draw per sample."""
    g = generator
    rotation = _uniform((n, 3), -config.rotation, config.rotation, g, device)
    scale = _uniform((n, 3), 1 - config.scale, 1 + config.scale, g, device)
    shear = _uniform((n, 6), -config.shear, config.shear, g, device)
    extent = torch.tensor(list(shape), dtype=torch.float32, device=device)
    translation = _uniform((n, 3), -config.translation_fraction, config.translation_fraction, g, device) * extent
    affine = affine_from_parameters(rotation, scale, translation, shear)

    # The elastic field is drawn on a grid coarse_factor times coarser: a smoothed
    # field is band-limited, so this matches full resolution at a fraction of the cost.
    coarse = [max(2, math.ceil(s / coarse_factor)) for s in shape]
    alpha = _uniform((n,), *config.elastic_alpha, g, device)
    sigma = _uniform((n,), *config.elastic_sigma, g, device)
    noise = torch.rand((n, 3, *coarse), generator=g, device=device) * 2 - 1
    smoothed = _gaussian_smooth(noise, sigma / coarse_factor)
    # Smoothing white noise scales its std by sigma^(-3/2); rescale so the displacement
    # statistics equal those of smoothing at full resolution with sigma.
    smoothed = smoothed * (alpha / coarse_factor ** 1.5).view(n, 1, 1, 1, 1)
    elastic = F.interpolate(smoothed, size=tuple(shape), mode="trilinear", align_corners=True)
    return compose_affine_then_local(affine, elastic)


def augment_pair(a: torch.Tensor, b: torch.Tensor, appearance: Optional[AppearanceConfig] = AppearanceConfig(),
                 spatial: Optional[SpatialConfig] = SpatialConfig(), generator=None):
    """Training inputs from clean crops a, b (N, 1, D, H, W).

    Returns ``(a_damaged, a_target, b_spatial)``: a and its damaged copy share one spatial
    draw, b gets an independent one.
    """
    a_damaged = damage_appearance(a, appearance, generator) if appearance is not None else a
    if spatial is None:
        return a_damaged, a, b
    n, shape = a.shape[0], a.shape[2:]
    flow_a = random_spatial_flow(n, shape, spatial, generator, a.device)
    flow_b = random_spatial_flow(n, shape, spatial, generator, a.device)
    both_a = warp(torch.cat([a_damaged, a], dim=1), flow_a)
    return both_a[:, :1], both_a[:, 1:], warp(b, flow_b)
