"""Pre-training losses. MONAI provides the local NCC and the diffusion regulariser; the
wrappers put them on the official scale (NCC loss = 1 - mean squared local NCC,
smoothness = mean over the three axes of the squared spatial gradient)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

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


@dataclass
class LossWeights:
    ncc: float = 1.0
    smooth: float = 1.0
    mse: float = 1.0
    field: float = 1.0  # known-transform pairs only (gvsl.synth); 0 = GVSL's own losses alone


class GVSLLoss(nn.Module):
    """Total = w_ncc * NCC(warped, a) + w_smooth * smooth(flow) + w_mse * MSE(restored, a)
    [+ w_field * FieldLoss(output, truth) for known-transform pairs]. ``truth`` may carry
    ``same_contrast`` (N,) bool: NCC is measured only on the samples where it means something."""

    def __init__(self, weights: LossWeights = LossWeights(), window: int = 9):
        super().__init__()
        self.weights = weights
        self.ncc = LocalNCCLoss(window)
        self.smooth = SmoothnessLoss()
        self.field = FieldLoss()

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
        return total, terms
