"""The GVSL network: 3D U-Net backbone, Z-matching head (affine + deformable) and
self-restoration head.

Module and parameter names follow the official GVSL3D-UNet (``unet.inc``, ``f_conv``,
``sp_conv``, ``out_flow``, ``fc_rot`` ...) so that the released weights load as they
are. Axes, coordinates and field directions are those of :mod:`gvsl.conventions`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conventions import compose_affine_then_local, affine_to_flow, warp

OFFICIAL_CHANNELS = (32, 64, 128, 256, 512, 256, 128, 64, 32)
# Bounds of the affine head, as in the official code (radians and scale factors).
MAX_ROTATION = math.pi / 9
MAX_SCALE_CHANGE = 0.25
MAX_SHEAR = math.pi / 18
# The official translation was unbounded. Bounded here in voxels (a quarter of a 128 grid),
# not as a fraction of the grid, so that a model trained on patches means the same
# translation on a larger working grid.
MAX_TRANSLATION_VOXELS = 32.0


@contextmanager
def full_precision(like: torch.Tensor):
    """Autocast off inside: the affine head, fields and sampling grids run in fp32 even when
    the convolutions around them run in bf16 / fp16 (a bf16 grid coordinate near 100 voxels
    is only good to half a voxel)."""
    with torch.autocast(device_type=like.device.type, enabled=False):
        yield


def use_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Channels-last 3D (NDHWC) convolution weights and activations for every backbone in
    ``model``, or back to the plain layout; parameter names and values are unchanged, so
    checkpoints load and save as before. Returns ``model``."""
    fmt = torch.channels_last_3d if enabled else torch.contiguous_format
    model.to(memory_format=fmt)  # only 5D weights change layout
    for module in model.modules():
        if isinstance(module, UNetBackbone):
            module.memory_format = fmt
    return model


def scaled_channels(width: float) -> Tuple[int, ...]:
    """Backbone channels for a width factor; multiples of 8 so that GroupNorm(C/8) works."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return tuple(max(8, int(round(c * width / 8.0)) * 8) for c in OFFICIAL_CHANNELS)


class DoubleConv(nn.Module):
    """2 x [Conv3d 3^3, GroupNorm(C/8), LeakyReLU(0.2)]: (N, Cin, D, H, W) -> (N, Cout, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.GroupNorm(out_channels // 8, out_channels),
            nn.LeakyReLU(0.2),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.GroupNorm(out_channels // 8, out_channels),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """MaxPool3d(2) then DoubleConv: halves D, H, W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Trilinear x2 upsampling (align_corners=True), concatenation [skip, up], DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, coarse, skip):
        up = F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class UNetBackbone(nn.Module):
    """The official 3D U-Net. ``forward(x)`` for x (N, 1, D, H, W) returns
    ``(global_features (N, C4, D/16', H/16', W/16'), local_features (N, C8, D, H, W))``;
    the input is padded to a multiple of 16 and the local features cropped back.
    ``forward(x, levels=True)`` also returns the coarser decoder outputs
    ``[bottleneck /16, up1 /8, up2 /4, up3 /2]`` on the padded grid (multi-scale descriptors)."""

    def __init__(self, in_channels: int = 1, channels: Tuple[int, ...] = OFFICIAL_CHANNELS):
        super().__init__()
        c = channels
        self.channels = tuple(channels)
        # Layout of the activations (see use_channels_last); not a parameter or buffer,
        # so the state_dict is the official one either way.
        self.memory_format = torch.contiguous_format
        self.inc = DoubleConv(in_channels, c[0])
        self.down1 = Down(c[0], c[1])
        self.down2 = Down(c[1], c[2])
        self.down3 = Down(c[2], c[3])
        self.down4 = Down(c[3], c[4])
        self.up1 = Up(c[4] + c[3], c[5])
        self.up2 = Up(c[5] + c[2], c[6])
        self.up3 = Up(c[6] + c[1], c[7])
        self.up4 = Up(c[7] + c[0], c[8])
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight)

    @property
    def feature_channels(self) -> int:
        return self.channels[8]

    def forward(self, x, levels: bool = False):
        size = x.shape[2:]
        pad = [(16 - s % 16) % 16 for s in size]
        # F.pad takes (W_before, W_after, H_before, H_after, D_before, D_after).
        x = F.pad(x, [pad[2] // 2, pad[2] - pad[2] // 2, pad[1] // 2, pad[1] - pad[1] // 2,
                      pad[0] // 2, pad[0] - pad[0] // 2])
        x1 = self.inc(x.contiguous(memory_format=self.memory_format))
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        u1 = self.up1(x5, x4)
        u2 = self.up2(u1, x3)
        u3 = self.up3(u2, x2)
        y = self.up4(u3, x1)
        d0, h0, w0 = pad[0] // 2, pad[1] // 2, pad[2] // 2
        local = y[:, :, d0:d0 + size[0], h0:h0 + size[1], w0:w0 + size[2]]
        if levels:
            return x5, local, [x5, u1, u2, u3]
        return x5, local


def affine_from_parameters(rotation, scale, translation, shear) -> torch.Tensor:
    """Batched, differentiable (N, 3, 4) centred voxel affine ``[Sh Sc Rz Ry Rx | t]``.

    rotation (N, 3) radians about the d, h, w axes; scale (N, 3); translation (N, 3)
    voxels; shear (N, 6) radians, ordered (dh, dw, hd, hw, wd, wh).
    """
    n = rotation.shape[0]
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rot_d = mat([[one, zero, zero], [zero, cos[:, 0], -sin[:, 0]], [zero, sin[:, 0], cos[:, 0]]])
    rot_h = mat([[cos[:, 1], zero, sin[:, 1]], [zero, one, zero], [-sin[:, 1], zero, cos[:, 1]]])
    rot_w = mat([[cos[:, 2], -sin[:, 2], zero], [sin[:, 2], cos[:, 2], zero], [zero, zero, one]])
    scale_m = torch.diag_embed(scale)
    t = torch.tan(shear)
    shear_m = mat([[one, t[:, 0], t[:, 1]], [t[:, 2], one, t[:, 3]], [t[:, 4], t[:, 5], one]])
    linear = shear_m @ scale_m @ rot_w @ rot_h @ rot_d
    return torch.cat([linear, translation.view(n, 3, 1)], dim=-1)


class GVSLOutput:
    """Result of :meth:`GVSL.forward` (all tensors on the input's device).

    affine (N, 3, 4), affine_flow / local_flow / flow (N, 3, D, H, W) in voxels,
    warped (N, 1, D, H, W) = b warped onto a, restored (N, 1, D, H, W),
    features_a / features_b (N, C, D, H, W) local decoder features,
    levels_a / levels_b: the coarser decoder levels ``[bottleneck, up1, up2, up3]`` on the
    grid padded to a multiple of 16 (see :mod:`gvsl.descriptors`).
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __repr__(self):
        return "GVSLOutput(" + ", ".join(
            f"{k}={tuple(v.shape) if torch.is_tensor(v) else v}" for k, v in self.__dict__.items()) + ")"


MATCHING_MODES = ("official", "correlation")
CORRELATION_STRIDE = 4  # the decoder level (up2) whose features are correlated
CORRELATION_RADIUS = 3  # offsets searched, in cells of that level: +-3 cells = +-12 working voxels
MEAN_SHIFT_STEPS = 4  # of the local soft-argmax (correlation_flow's window); 2 and 4 measured alike


def correlation_flow(features_a: torch.Tensor, features_b: torch.Tensor, radius: int,
                     temperature: torch.Tensor, window: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax matching: for every cell of ``features_a`` (N, C, d, h, w), the expected
    offset (N, 3, d, h, w), in cells, of its match among the (2 radius + 1)^3 cells of
    ``features_b`` around it, under a softmax of the cosine similarities divided by
    ``temperature``; and the confidence (N, 1, d, h, w), the largest softmax weight (over the
    whole search). Outside ``features_b`` the similarity is 0.

    ``window``: a local soft-argmax. Over the whole search every fairly similar cell pulls the
    answer towards itself (the shipped model moved an image against itself by about a voxel on
    held-out volumes); with a window, the answer is refined by ``MEAN_SHIFT_STEPS`` mean-shift
    steps: the softmax weights times a Gaussian of ``window`` cells around the current answer.
    Unlike an expectation over the cells next to the hard argmax (tried: it also halved that
    motion, but jumped by a cell where two offsets nearly tie, so bf16 and fp32 disagreed by 5
    voxels and folding rose), the answer stays a continuous function of the features. None: the
    whole search."""
    fa = F.normalize(features_a.float(), dim=1)
    fb = F.pad(F.normalize(features_b.float(), dim=1), [radius] * 6)
    d, h, w = fa.shape[2:]
    offsets, scores = [], []
    span = range(-radius, radius + 1)
    for dz in span:
        for dy in span:
            for dx in span:
                shifted = fb[:, :, radius + dz:radius + dz + d, radius + dy:radius + dy + h, radius + dx:radius + dx + w]
                scores.append((fa * shifted).sum(1))
                offsets.append((dz, dy, dx))
    scores = torch.stack(scores, 1)  # (N, K, d, h, w)
    logits = scores / temperature
    weights = torch.softmax(logits, dim=1)
    offset = torch.tensor(offsets, dtype=fa.dtype, device=fa.device)  # (K, 3)
    confidence = weights.amax(dim=1, keepdim=True)
    flow = torch.einsum("nkdhw,kc->ncdhw", weights, offset)
    if window is not None:
        # -|o - f|^2 / (2 s^2) = (o . f) / s^2 - |o|^2 / (2 s^2) - |f|^2 / (2 s^2); the last term is
        # the same for every offset of a cell, so the softmax drops it: no (N, K, 3, d, h, w) tensor.
        variance = float(window) ** 2
        offset_prior = (offset ** 2).sum(dim=1).view(1, -1, 1, 1, 1) / (2.0 * variance)
        for _ in range(MEAN_SHIFT_STEPS):
            towards = torch.einsum("kc,ncdhw->nkdhw", offset, flow) / variance
            weights = torch.softmax(logits - offset_prior + towards, dim=1)
            flow = torch.einsum("nkdhw,kc->ncdhw", weights, offset)
    return flow, confidence


def checked_match_window(match_window) -> Optional[int]:
    """``match_window`` as an int of 1 to ``CORRELATION_RADIUS`` cells, or None (the whole search)."""
    if match_window is None:
        return None
    if not 1 <= int(match_window) <= CORRELATION_RADIUS:
        raise ValueError(f"match_window must be 1 to {CORRELATION_RADIUS} cells or None, got {match_window!r}")
    return int(match_window)


def fit_affine(flow: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares centred voxel affine (N, 3, 4) of a displacement (N, 3, D, H, W):
    the ``A`` minimising ``sum w |A(p) - (p + flow(p))|^2`` in the convention of
    :func:`gvsl.conventions.affine_to_flow`."""
    from .conventions import grid_center, identity_voxel_grid
    n, shape = flow.shape[0], flow.shape[2:]
    p = (identity_voxel_grid(shape, flow.device, torch.float64)
         - grid_center(shape, flow.device, torch.float64).view(1, 3, 1, 1, 1)).reshape(1, 3, -1)
    q = p + flow.double().reshape(n, 3, -1)
    w = weights.double().reshape(n, 1, -1)
    x = torch.cat([p.expand(n, -1, -1), torch.ones_like(w)], 1)  # (N, 4, V)
    normal = (x * w) @ x.transpose(1, 2) + 1e-6 * torch.eye(4, dtype=x.dtype, device=x.device)
    rhs = (x * w) @ q.transpose(1, 2)  # (N, 4, 3)
    return torch.linalg.solve(normal, rhs).transpose(1, 2).float()  # (N, 3, 4) = [L | t]


class GVSL(nn.Module):
    """GVSL pre-training model. ``model(a, b)`` with a, b (N, 1, D, H, W) in [0, 1].

    ``width`` scales every channel count (1.0 = the official 32...512 network).

    ``matching`` chooses how the Z-matching head finds the global motion:

    * ``"official"``: the affine is regressed from the bottleneck features (fc heads) and
      the deformable head sees the affinely aligned last-layer features (its receptive field
      is 7 voxels: it can only correct small residuals).
    * ``"correlation"``: the up2 (stride 4) features of A and B are correlated over +-3
      cells (+-12 working voxels); the soft-argmax of the similarity gives a coarse
      displacement, the affine is its confidence-weighted least-squares fit, and the
      deformable head refines the residual on the features aligned by the coarse
      displacement. The same feature similarity that the heatmaps show is what matches,
      so training the match trains the heatmaps. In 820 steps of known-transform training
      the official head learned nothing (field error 44.83 vs 44.84 voxel^2 for a zero
      field), which is why this mode exists.
    """

    def __init__(self, width: float = 1.0, in_channels: int = 1, matching: str = "official",
                 match_window: Optional[int] = None):
        super().__init__()
        if matching not in MATCHING_MODES:
            raise ValueError(f"matching must be one of {', '.join(MATCHING_MODES)}, got {matching!r}")
        self.width = float(width)
        self.matching = matching
        # Local soft-argmax of the correlation head, in cells (see correlation_flow); None = whole search.
        self.match_window = checked_match_window(match_window)
        chans = scaled_channels(width)
        self.unet = UNetBackbone(in_channels, chans)
        hidden = max(8, int(round(256 * width / 8)) * 8)
        # Z-matching, global half: global features of moving and fixed -> bounded affine.
        self.f_conv = DoubleConv(2 * chans[4], hidden)
        self.fc_rot = nn.Linear(hidden, 3)
        self.fc_scl = nn.Linear(hidden, 3)
        self.fc_trans = nn.Linear(hidden, 3)
        self.fc_shear = nn.Linear(hidden, 6)
        for fc in (self.fc_rot, self.fc_scl, self.fc_trans, self.fc_shear):
            # Small, non-zero weights: the head starts near identity, yet every layer
            # below it receives a gradient from the first step.
            nn.init.normal_(fc.weight, std=1e-3)
            nn.init.zeros_(fc.bias)
        # Z-matching, local half: aligned moving and fixed local features -> displacement.
        flow_hidden = max(8, int(round(16 * width / 8)) * 8)
        res_hidden = max(4, int(round(16 * width / 4)) * 4)
        self.sp_conv = DoubleConv(2 * chans[8], flow_hidden)
        self.out_flow = nn.Conv3d(flow_hidden, 3, 3, padding=1)
        nn.init.normal_(self.out_flow.weight, std=1e-5)
        nn.init.zeros_(self.out_flow.bias)
        self.res_conv = nn.Sequential(nn.Conv3d(chans[8], res_hidden, 3, padding=1),
                                      nn.GroupNorm(res_hidden // 4, res_hidden),
                                      nn.LeakyReLU(0.2),
                                      nn.Conv3d(res_hidden, 1, 1))
        if matching == "correlation":
            # log of the softmax temperature on cosine similarities
            self.match_log_temperature = nn.Parameter(torch.tensor(math.log(0.05)))

    @property
    def config(self) -> dict:
        config = {"width": self.width, "in_channels": self.unet.inc.double_conv[0].in_channels}
        if self.matching != "official":
            config["matching"] = self.matching
        if self.match_window is not None:
            config["match_window"] = self.match_window
        return config

    def coarse_match(self, level_a: torch.Tensor, level_b: torch.Tensor, shape) -> Tuple[torch.Tensor, torch.Tensor]:
        """(coarse displacement (N, 3, *shape) in working voxels, its affine fit (N, 3, 4)) from
        the stride-4 decoder levels (on the grid padded to a multiple of 16)."""
        with full_precision(level_a):
            temperature = self.match_log_temperature.exp()
            cells, confidence = correlation_flow(level_a, level_b, CORRELATION_RADIUS, temperature, self.match_window)
            padded = [int(math.ceil(s / 16) * 16) for s in shape]
            # align_corners=True: level cell i sits at padded voxel i (P - 1) / (n - 1)
            scale = torch.tensor([(p - 1) / max(n - 1, 1) for p, n in zip(padded, cells.shape[2:])],
                                 device=cells.device).view(1, 3, 1, 1, 1)
            dense = F.interpolate(cells * scale, size=padded, mode="trilinear", align_corners=True)
            weights = F.interpolate(confidence, size=padded, mode="trilinear", align_corners=True)
            lo = [(p - s) // 2 for p, s in zip(padded, shape)]
            crop = (slice(None), slice(None)) + tuple(slice(o, o + s) for o, s in zip(lo, shape))
            dense, weights = dense[crop], weights[crop]
            return dense, fit_affine(dense, weights)

    def predict_affine(self, global_moving, global_fixed) -> torch.Tensor:
        with full_precision(global_moving):
            # The whole affine head in fp32: it sees the coarsest grid (1/16 per axis), so this
            # costs ~1 % of the network, and oneDNN's bf16 weight gradient for this 2^3-voxel
            # convolution (32^3 patches) came back NaN on an AVX-512-BF16 CPU.
            x = self.f_conv(torch.cat([global_moving, global_fixed], dim=1).float())
            pooled = x.mean(dim=(2, 3, 4))
            # tanh keeps the official bounds, but unlike the official clamp it never stops the
            # gradient: a clamped head that overshoots its bound once stays stuck there.
            rotation = torch.tanh(self.fc_rot(pooled)) * MAX_ROTATION
            scale = torch.tanh(self.fc_scl(pooled)) * MAX_SCALE_CHANGE + 1
            shear = torch.tanh(self.fc_shear(pooled)) * MAX_SHEAR
            translation = torch.tanh(self.fc_trans(pooled)) * MAX_TRANSLATION_VOXELS
            return affine_from_parameters(rotation, scale, translation, shear)

    def restore(self, local_features):
        return self.res_conv(local_features)

    def forward(self, a: torch.Tensor, b: torch.Tensor, restore: bool = True) -> GVSLOutput:
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        n, shape = a.shape[0], a.shape[2:]
        # One backbone pass over both volumes: GroupNorm is per sample, so this equals two passes.
        global_feats, local_feats, levels = self.unet(torch.cat([a, b], dim=0), levels=True)
        global_a, global_b = global_feats[:n], global_feats[n:]
        local_a, local_b = local_feats[:n], local_feats[n:]

        coarse = None
        if self.matching == "correlation":
            coarse, affine = self.coarse_match(levels[2][:n], levels[2][n:], shape)
        else:
            affine = self.predict_affine(global_b, global_a)
        with full_precision(a):
            affine_flow = affine_to_flow(affine, shape)
            aligned_local_b = warp(local_b.float(), affine_flow if coarse is None else coarse)
        # Features (not coordinates) may go back to the convolutions' dtype and layout.
        aligned_local_b = aligned_local_b.to(local_a.dtype).contiguous(memory_format=self.unet.memory_format)
        hidden = self.sp_conv(torch.cat([aligned_local_b, local_a], dim=1))
        with full_precision(a):
            # The last layer in fp32: it is small, and its output is the field itself.
            local_flow = self.out_flow(hidden.float())
            if coarse is not None:
                # The head refines the coarse displacement: flow = coarse + residual. Expressed
                # as A(p + u) like the official output: u = L^-1 (flow - affine flow).
                residual_total = coarse + local_flow - affine_flow
                local_flow = torch.einsum("nij,njdhw->nidhw", torch.linalg.inv(affine[:, :, :3]), residual_total)
            flow = compose_affine_then_local(affine, local_flow)
            warped = warp(b.float(), flow)
        restored = self.restore(local_a) if restore else None
        return GVSLOutput(affine=affine, affine_flow=affine_flow, local_flow=local_flow, flow=flow,
                          warped=warped, restored=restored, features_a=local_a, features_b=local_b,
                          levels_a=[level[:n] for level in levels], levels_b=[level[n:] for level in levels])


class SegmentationNet(nn.Module):
    """The downstream network of the official recipe: GVSL backbone + 3^3 convolution.
    ``forward(x)`` returns logits (N, classes + 1, D, H, W); softmax gives probabilities."""

    def __init__(self, num_classes: int, width: float = 1.0, in_channels: int = 1):
        super().__init__()
        self.width = float(width)
        self.num_classes = int(num_classes)
        self.backbone = UNetBackbone(in_channels, scaled_channels(width))
        self.head = nn.Conv3d(self.backbone.feature_channels, num_classes + 1, kernel_size=3, padding=1)

    @property
    def config(self) -> dict:
        return {"width": self.width, "num_classes": self.num_classes}

    def load_backbone_from(self, gvsl_model: "GVSL"):
        self.backbone.load_state_dict(gvsl_model.unet.state_dict())

    def freeze_backbone(self):
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x)[1])
