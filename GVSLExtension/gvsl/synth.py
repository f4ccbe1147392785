"""Known-transform training pairs generated on the fly, on the training device, with no disk.

Each pair is ``(a, b, flow)``: ``b`` is the moving volume, ``a`` the fixed one, made as
``a(p) = b(p + flow(p))`` with a random ``flow`` whose affine and elastic parts are known.
So the Z-matching head can be told the answer (``losses.FieldLoss``), and it learns to
undo real misalignment instead of raising local NCC with folds.

Where the moving volume comes from (one draw per sample):

* a crop of a real training volume, as it is or re-rendered with a random contrast;
* a SynthMorph-style synthetic label map (Hoffmann et al., IEEE TMI 2022): the argmax of
  ``K`` smooth random fields, warped once more, rendered with one random intensity and
  texture per label, blurred, multiplied by a smooth bias field, gamma-curved and noised.

The fixed volume shares the moving one's contrast (a mono-modal pair, where local NCC is
meaningful) unless ``independent_contrast`` draws a second rendering of the same labels
(contrast-invariant matching; NCC is then switched off for that sample).

Shapes are ``(N, 1, D, H, W)`` volumes in [0, 1] and ``(N, 3, D, H, W)`` displacements in
voxels, channels ``(d, h, w)``, in the direction of :mod:`gvsl.conventions`:
``T(p) = A(p + u(p))`` maps a fixed voxel to the moving voxel.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .conventions import affine_to_flow, compose_affine_then_local, warp
from .network import affine_from_parameters


@dataclass
class KnownPairConfig:
    """Ranges of the known transforms (voxels and radians of the training grid) and the mix
    of sources. The defaults cover, with margin, the misalignment ``gvsl match`` meets after
    centring both working grids: +-8 degrees, +-8 mm, +-6 % scale and a 4 mm elastic field
    at 3 mm voxels (``samples.random_deformation``)."""
    rotation_deg: float = 10.0
    scale: float = 0.10
    shear: float = 0.03
    translation_voxels: float = 5.0
    elastic_voxels: float = 1.5          # std of the elastic displacement, per component
    elastic_control_voxels: float = 12.0  # spacing of its random control grid
    # A second, coarser elastic component drawn for a fraction of the samples: the smooth,
    # larger shape differences between two subjects of one region (0 = off, the shipped recipe).
    coarse_elastic_voxels: float = 0.0
    coarse_control_voxels: float = 24.0
    coarse_fraction: float = 0.5
    synthetic_fraction: float = 0.35      # samples drawn from synthetic label maps
    recontrast_fraction: float = 0.5      # real samples re-rendered with a random contrast
    independent_contrast: float = 0.25    # samples whose fixed volume gets a second contrast
    # Samples where one of the two volumes shows only an inner part of the anatomy (the rest is
    # background), as a skull-stripped brain against a whole head: content that is missing is
    # no reason to move (0 = off, the shipped recipe).
    strip_fraction: float = 0.0
    # Samples whose whole transform (every affine range and the elastic amplitude) is scaled by
    # u^2, u uniform in [0, 1]: pairs already close to aligned, as two scans in one scanner
    # space or a second pass of the network. Without them the ranges above almost never draw a
    # near-identity transform, and the network moved pairs that needed no motion (0 = off).
    aligned_fraction: float = 0.0
    labels: Sequence[int] = (6, 16)       # label count range of a synthetic map

    def to_json(self) -> dict:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data


def _uniform(shape, low, high, generator, device):
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def smooth_noise(n: int, channels: int, shape: Sequence[int], control_voxels: float, generator=None,
                 device="cpu") -> torch.Tensor:
    """(n, channels, *shape) smooth random fields of unit-order amplitude: normal noise on a
    control grid ``control_voxels`` apart, interpolated trilinearly and smoothed once at the
    control scale so that the result has no grid-line kinks."""
    coarse = [max(2, int(math.ceil(s / control_voxels)) + 1) for s in shape]
    noise = torch.randn((n, channels, *coarse), generator=generator, device=device)
    fine = [max(4, s // 4) for s in shape]
    mid = F.interpolate(noise, size=fine, mode="trilinear", align_corners=True)
    mid = F.avg_pool3d(F.pad(mid, [1] * 6, mode="replicate"), 3, stride=1)
    return F.interpolate(mid, size=tuple(shape), mode="trilinear", align_corners=True)


def random_known_flow(n: int, shape: Sequence[int], config: KnownPairConfig, generator=None, device="cpu"):
    """(flow, affine_flow, affine): a random ``T(p) = A(p + u(p))`` as displacements
    (n, 3, *shape) in voxels, with its affine part alone and the (n, 3, 4) centred affine."""
    rotation = _uniform((n, 3), -1, 1, generator, device) * math.radians(config.rotation_deg)
    scale = _uniform((n, 3), -config.scale, config.scale, generator, device)
    shear = _uniform((n, 6), -config.shear, config.shear, generator, device)
    translation = _uniform((n, 3), -config.translation_voxels, config.translation_voxels, generator, device)
    magnitude = torch.ones((n, 1), device=device)
    if config.aligned_fraction > 0:  # drawn only when on: the older recipes keep their random streams
        near = _uniform((n, 1), 0.0, 1.0, generator, device) < config.aligned_fraction
        magnitude = torch.where(near, _uniform((n, 1), 0.0, 1.0, generator, device) ** 2, magnitude)
        rotation, scale, shear, translation = (v * magnitude for v in (rotation, scale, shear, translation))
    affine = affine_from_parameters(rotation, 1 + scale, translation, shear)
    field = smooth_noise(n, 3, shape, config.elastic_control_voxels, generator, device)
    # Normalise the std per sample (smoothing shrinks it), then draw the sample's amplitude.
    field = field / field.flatten(1).std(dim=1).clamp_min(1e-6).view(n, 1, 1, 1, 1)
    amplitude = _uniform((n,), 0.0, 1.0, generator, device) * config.elastic_voxels * magnitude.view(n)
    elastic = field * amplitude.view(n, 1, 1, 1, 1)
    if config.coarse_elastic_voxels > 0:
        coarse = smooth_noise(n, 3, shape, config.coarse_control_voxels, generator, device)
        coarse = coarse / coarse.flatten(1).std(dim=1).clamp_min(1e-6).view(n, 1, 1, 1, 1)
        drawn = (_uniform((n,), 0.0, 1.0, generator, device) < config.coarse_fraction).float()
        coarse_amplitude = (_uniform((n,), 0.0, 1.0, generator, device) * config.coarse_elastic_voxels * drawn
                            * magnitude.view(n))
        elastic = elastic + coarse * coarse_amplitude.view(n, 1, 1, 1, 1)
    return compose_affine_then_local(affine, elastic), affine_to_flow(affine, shape), affine


def synthetic_label_map(n: int, shape: Sequence[int], config: KnownPairConfig, generator=None,
                        device="cpu") -> torch.Tensor:
    """(n, 1, *shape) integer label maps: argmax of K smooth random fields, deformed once more
    so that boundaries are not aligned with the noise grid; label 0 is a background outside
    a smooth random body shape in most maps, as in real scans."""
    maps = []
    for _ in range(n):
        k = int(torch.randint(config.labels[0], config.labels[1] + 1, (1,), generator=generator, device=device))
        control = float(_uniform((1,), 6.0, 16.0, generator, device))
        fields = smooth_noise(1, k, shape, control, generator, device)
        warp_field = smooth_noise(1, 3, shape, 16.0, generator, device) * 3.0
        fields = warp(fields, warp_field, padding_mode="border")
        labels = fields.argmax(dim=1, keepdim=True) + 1
        if float(torch.rand((1,), generator=generator, device=device)) < 0.8:
            body = _body_mask(shape, generator, device)
            labels = torch.where(body, labels, torch.zeros_like(labels))
        maps.append(labels)
    return torch.cat(maps)


def _random_ellipsoid(shape, radii, centre, wobble, generator, device) -> torch.Tensor:
    """(1, 1, *shape) bool: an ellipsoid with radii uniform in ``radii`` and centre uniform in
    ``centre`` (fractions of the half sides), its boundary moved by smooth noise of ``wobble``."""
    axes = [torch.linspace(-1, 1, s, device=device) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    radius_xyz = _uniform((3,), *radii, generator, device).view(3, 1, 1, 1)
    centre_xyz = _uniform((3,), *centre, generator, device).view(3, 1, 1, 1)
    radius = (((grid - centre_xyz) / radius_xyz) ** 2).sum(0, keepdim=True).sqrt()[None]
    return (radius + smooth_noise(1, 1, shape, 16.0, generator, device) * wobble) < 1.0


def _body_mask(shape, generator, device) -> torch.Tensor:
    """(1, 1, *shape) bool: a random body outline."""
    return _random_ellipsoid(shape, (0.6, 1.0), (-0.15, 0.15), 0.12, generator, device)


def strip_outer(labels: torch.Tensor, generator=None) -> torch.Tensor:
    """``labels`` (1, 1, D, H, W) with everything outside a random smaller ellipsoid (radii 45-85 %
    of the patch's half sides, smooth random boundary) set to background 0."""
    inner = _random_ellipsoid(labels.shape[2:], (0.45, 0.85), (-0.1, 0.1), 0.1, generator, labels.device)
    return torch.where(inner, labels, torch.zeros_like(labels))


def render(labels: torch.Tensor, generator=None) -> torch.Tensor:
    """SynthMorph rendering of label maps (n, 1, D, H, W) -> intensities in [0, 1]."""
    n, device = labels.shape[0], labels.device
    out = []
    for i in range(n):
        lab = labels[i:i + 1].long()
        count = int(lab.max()) + 1
        means = torch.rand((count,), generator=generator, device=device)
        if float(torch.rand((1,), generator=generator, device=device)) < 0.8:
            means[0] = torch.rand((1,), generator=generator, device=device) * 0.1  # dark background
        texture = torch.rand((count,), generator=generator, device=device) * 0.08
        image = means[lab] + texture[lab] * torch.randn(lab.shape, generator=generator, device=device)
        sigma = float(torch.rand((1,), generator=generator, device=device)) * 1.2
        if sigma > 0.2:
            image = _blur(image, sigma)
        bias = smooth_noise(1, 1, lab.shape[2:], 24.0, generator, device)
        bias_strength = float(torch.rand((1,), generator=generator, device=device)) * 0.3
        image = image.clamp_min(0) * torch.exp(bias * bias_strength)
        image = image / image.amax().clamp_min(1e-6)
        gamma = math.exp(float(torch.randn((1,), generator=generator, device=device)) * 0.25)
        image = image.clamp_min(0) ** gamma
        noise = float(torch.rand((1,), generator=generator, device=device)) * 0.05
        image = image + noise * torch.randn(lab.shape, generator=generator, device=device)
        out.append(image.clamp(0, 1))
    return torch.cat(out)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    r = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (r / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        image = F.conv3d(F.pad(image, pad, mode="replicate"), kernel.view(shape))
    return image


def intensity_classes(volume: torch.Tensor, generator=None) -> torch.Tensor:
    """(n, 1, D, H, W) class maps of real volumes: intensity bins at random quantiles, so that a
    real anatomy can be re-rendered with a contrast it was never scanned with."""
    out = []
    for i in range(volume.shape[0]):
        v = volume[i:i + 1]
        k = int(torch.randint(4, 9, (1,), generator=generator, device=v.device))
        q = torch.sort(torch.rand((k - 1,), generator=generator, device=v.device) * 0.9 + 0.05).values
        sample = v.flatten()[:: max(1, v.numel() // 65536)].float()
        edges = torch.quantile(sample, q)
        out.append(torch.bucketize(v.contiguous(), edges) + 1)
    return torch.cat(out)


class KnownPairSource:
    """Draws known-transform pairs from real training volumes and synthetic label maps.

    ``sample(batch)`` returns a dict of tensors on ``device``: ``a`` (fixed) and ``b``
    (moving) volumes (N, 1, *patch), ``flow`` and ``affine_flow`` (N, 3, *patch) truths,
    and ``same_contrast`` (N,) bool. Crop positions come from ``crops`` (a
    :class:`gvsl.data.PairSampler`, whose RNG state the checkpoints keep)."""

    def __init__(self, crops, patch: Sequence[int], config: Optional[KnownPairConfig] = None,
                 generator: Optional[torch.Generator] = None, device="cpu"):
        self.crops = crops
        self.patch = tuple(int(p) for p in patch)
        self.config = config or KnownPairConfig()
        self.generator = generator
        self.device = torch.device(device)

    def _chance(self, p: float) -> bool:
        return float(torch.rand((1,), generator=self.generator, device=self.device)) < p

    def _moving(self):
        """One moving volume (1, 1, *patch) and its class map (or None for a plain real crop)."""
        cfg, g = self.config, self.generator
        if self._chance(cfg.synthetic_fraction):
            labels = synthetic_label_map(1, self.patch, cfg, g, self.device)
            return render(labels, g), labels
        rng = self.crops.rng
        array = self.crops.arrays[int(rng.integers(len(self.crops.arrays)))]
        volume = torch.from_numpy(self.crops.crop(array, rng.random(3)))[None, None].to(self.device)
        if self._chance(cfg.recontrast_fraction):
            labels = intensity_classes(volume, g)
            return render(labels, g), labels
        return volume, None

    def sample(self, batch: int) -> dict:
        cfg, g = self.config, self.generator
        flow, affine_flow, _ = random_known_flow(batch, self.patch, cfg, g, self.device)
        a, b, same = [], [], []
        for i in range(batch):
            moving, labels = self._moving()
            independent = labels is not None and self._chance(cfg.independent_contrast)
            source = render(labels, g) if independent else moving
            if labels is not None and cfg.strip_fraction > 0 and self._chance(cfg.strip_fraction):
                stripped = render(strip_outer(labels, g), g)
                if self._chance(0.5):
                    source = stripped  # the fixed volume is the stripped one
                else:
                    moving = stripped
                independent = True  # different content: no NCC between them, the known field only
            a.append(warp(source, flow[i:i + 1]))
            b.append(moving)
            same.append(not independent)
        return {"a": torch.cat(a), "b": torch.cat(b), "flow": flow, "affine_flow": affine_flow,
                "same_contrast": torch.tensor(same, device=self.device)}
