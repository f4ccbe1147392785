"""Pre-training losses. MONAI provides the local NCC and the diffusion regulariser; the
wrappers put them on the official scale (NCC loss = 1 - mean squared local NCC,
smoothness = mean over the three axes of the squared spatial gradient)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from .conventions import sample_at

# MONAI's spatial_gradient indexes with a list; harmless, but noisy on every step.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")


class LocalNCCLoss(nn.Module):
    """1 - mean squared local NCC over a ``window``^3 box; 0 for identical images."""

    def __init__(self, window: int = 9):
        super().__init__()
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=window,
                                                        kernel_type="rectangular", reduction="none")

    def forward(self, prediction, target, mask=None):
        squared_ncc = -self.lncc(prediction.float(), target.float())
        if mask is None:
            return 1.0 - squared_ncc.mean()
        mask = mask.float()
        return 1.0 - (squared_ncc * mask).sum() / mask.sum().clamp_min(1.0)


class SmoothnessLoss(nn.Module):
    """Mean squared spatial gradient of a displacement field (N, 3, D, H, W)."""

    def __init__(self):
        super().__init__()
        self.diffusion = DiffusionLoss(normalize=False)

    def forward(self, flow):
        # MONAI sums the three axes' squared gradients; the official loss averages them.
        return self.diffusion(flow.float()) / 3.0


class FieldLoss(nn.Module):
    """Mean squared error (voxels^2, summed over the 3 components) between a predicted and a
    known displacement (N, 3, D, H, W); the affine head's own flow is held to the known
    affine part with half the weight, so that the global half of Z-matching learns the global
    motion instead of leaving it all to the local field."""

    def forward(self, output, truth):
        fused = ((output.flow.float() - truth["flow"]) ** 2).sum(1).mean()
        affine = ((output.affine_flow.float() - truth["affine_flow"]) ** 2).sum(1).mean()
        return fused + 0.5 * affine


class DescriptorContrastLoss(nn.Module):
    """Dense InfoNCE on the heatmap's own multi-scale descriptors (:mod:`gvsl.descriptors`), for
    known-transform pairs, as in SAM (Yan et al., IEEE TMI 2022): the descriptor of a voxel ``p``
    of A must be more similar to B's descriptor at its true match ``p + flow(p)`` than to B's
    descriptors at the other sampled matches (far negatives) and at ``local_negatives`` points
    ``radius`` voxels around its own match (near negatives, which decide the last voxels of a
    heatmap's error). The similarity is the heatmap's: the weighted mean over levels of the
    per-level cosine similarity, so training and the heatmap measure the same thing.

    ``points`` query voxels are drawn per sample, four times likelier inside A's foreground
    (where a user clicks) than in its background."""

    def __init__(self, points: int = 128, local_negatives: int = 8, radius: Sequence[float] = (2.0, 6.0),
                 temperature: float = 0.1, level_weights: Optional[Sequence[float]] = None, seed: int = 0):
        super().__init__()
        from .descriptors import DEFAULT_WEIGHTS
        self.points, self.local_negatives = int(points), int(local_negatives)
        self.radius, self.temperature = tuple(float(r) for r in radius), float(temperature)
        self.level_weights = tuple(DEFAULT_WEIGHTS if level_weights is None else level_weights)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _levels(self, output, side: str, index: int):
        """[(weight, (1, C, d, h, w))] coarse to fine, the levels the heatmap weighs above 0."""
        levels = list(getattr(output, f"levels_{side}") or []) + [getattr(output, f"features_{side}")]
        return [(w, level[index:index + 1].float()) for w, level in zip(self.level_weights, levels) if w > 0]

    @staticmethod
    def _sample(level: torch.Tensor, voxels_dhw: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Unit descriptors (K, C) of ``level`` at working-grid voxels (K, 3) of a grid of ``shape``:
        the level is the padded grid at its own resolution (align_corners=True, as the heatmap's
        upsampling), so a working voxel maps to level index ``(v + pad) (n - 1) / (N - 1)``."""
        from .descriptors import _pad_before, padded_shape
        padded = torch.tensor(padded_shape(shape), dtype=voxels_dhw.dtype)
        n = torch.tensor(level.shape[2:], dtype=voxels_dhw.dtype)
        pad = torch.as_tensor(_pad_before(shape), dtype=voxels_dhw.dtype)
        coords = (voxels_dhw + pad) * (n - 1) / (padded - 1).clamp_min(1)
        sampled = sample_at(level, coords.t().reshape(1, 3, -1, 1, 1).to(level.device), padding_mode="border")
        return F.normalize(sampled.reshape(level.shape[1], -1).t(), dim=1)

    def forward(self, output, truth, target_a: torch.Tensor) -> torch.Tensor:
        shape = tuple(target_a.shape[2:])
        limit = torch.tensor(shape, dtype=torch.float32) - 1
        g, k, m = self.generator, self.points, self.local_negatives
        losses = []
        for i in range(target_a.shape[0]):
            a = target_a[i, 0].detach().float().cpu().flatten()
            # Draw from 8K uniform candidates (a multinomial over every voxel costs more than the loss).
            pool = torch.randint(a.numel(), (8 * k,), generator=g)
            weights = 1.0 + 3.0 * (a[pool] > a.min() + 0.05 * (a.max() - a.min())).float()
            flat = pool[torch.multinomial(weights, k, replacement=False, generator=g)]
            index = torch.stack(torch.unravel_index(flat, shape), dim=1)  # (K, 3) voxels of A
            flow = truth["flow"][i].detach().float().cpu()
            p = index.float()
            q = p + flow[:, index[:, 0], index[:, 1], index[:, 2]].t()
            inside = ((q >= 0) & (q <= limit)).all(1)
            if int(inside.sum()) < 2:
                continue
            p, q = p[inside], q[inside]
            direction = F.normalize(torch.randn(len(q), m, 3, generator=g), dim=2)
            distance = torch.empty(len(q), m, 1).uniform_(*self.radius, generator=g)
            near = torch.minimum(torch.maximum(q[:, None] + direction * distance, torch.zeros(3)), limit)
            candidates = torch.cat([q, near.reshape(-1, 3)])  # column j < len(q): the match of query j
            logits = 0.0
            total = sum(w for w, _ in self._levels(output, "a", i))
            for (w, level_a), (_, level_b) in zip(self._levels(output, "a", i), self._levels(output, "b", i)):
                logits = logits + (w / total) * (self._sample(level_a, p, shape)
                                                 @ self._sample(level_b, candidates, shape).t())
            targets = torch.arange(len(q), device=logits.device)
            losses.append(F.cross_entropy(logits / self.temperature, targets))
        if not losses:
            return target_a.new_zeros(()).float()
        return torch.stack(losses).mean()


@dataclass
class LossWeights:
    ncc: float = 1.0
    smooth: float = 1.0
    mse: float = 1.0
    field: float = 1.0  # known-transform pairs only (gvsl.synth); 0 = GVSL's own losses alone
    contrast: float = 0.0  # known-transform pairs only: DescriptorContrastLoss (SAM-style), 0 = off


class GVSLLoss(nn.Module):
    """Total = w_ncc * NCC(warped, a) + w_smooth * smooth(flow) + w_mse * MSE(restored, a)
    [+ w_field * FieldLoss(output, truth) + w_contrast * DescriptorContrastLoss for known-transform
    pairs]. ``truth`` may carry
    ``same_contrast`` (N,) bool: NCC is measured only on the samples where it means something."""

    def __init__(self, weights: LossWeights = LossWeights(), window: int = 9, seed: int = 0):
        super().__init__()
        self.weights = weights
        self.ncc = LocalNCCLoss(window)
        self.smooth = SmoothnessLoss()
        self.field = FieldLoss()
        self.contrast = DescriptorContrastLoss(seed=seed)

    def forward(self, output, target_a, truth=None):
        mask = None
        if truth is not None and "same_contrast" in truth:
            mask = truth["same_contrast"].float().view(-1, 1, 1, 1, 1).expand_as(target_a)
        terms = {
            "ncc": self.ncc(output.warped, target_a, mask),
            "smooth": self.smooth(output.local_flow),
            "mse": torch.mean((output.restored.float() - target_a.float()) ** 2),
        }
        total = (self.weights.ncc * terms["ncc"] + self.weights.smooth * terms["smooth"]
                 + self.weights.mse * terms["mse"])
        if truth is not None:
            terms["field"] = self.field(output, truth)
            total = total + self.weights.field * terms["field"]
            if self.weights.contrast > 0:
                terms["contrast"] = self.contrast(output, truth, target_a)
                total = total + self.weights.contrast * terms["contrast"]
        return total, terms
