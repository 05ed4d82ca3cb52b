"""Boundary-aware segmentation losses used for Fisher calibration and recovery."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["boundary_band", "boundary_weighted_bce_dice", "soft_dice_loss"]

Reduction = Literal["mean", "sum"]


def _dilate3x3(mask: torch.Tensor) -> torch.Tensor:
    # max-pool of a {0,1} map is the 3x3 binary dilation with zero padding.
    return F.max_pool2d(mask, kernel_size=3, stride=1, padding=1)


def boundary_band(mask: torch.Tensor) -> torch.Tensor:
    """Two-pixel boundary ring of a binary mask ``[B, 1, H, W]``: 3x3 dilation minus 3x3 erosion.

    Pixels outside the image count as background, so a mask touching the border has a band there.
    """
    mask = (mask > 0.5).to(torch.float32)
    dilated = _dilate3x3(mask)
    # erosion with background outside the image: 1 - dilate(1 - mask) with the border padded as background
    eroded = 1.0 - F.max_pool2d(F.pad(1.0 - mask, (1, 1, 1, 1), value=1.0), kernel_size=3, stride=1)
    return (dilated - eroded).clamp_(0.0, 1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, squared: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """Mean over the batch of ``1 - (2 sum(p y) + eps) / (sum(p^k) + sum(y^k) + eps)`` with ``k = 2`` if squared."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1).to(prob.dtype)
    power = 2 if squared else 1
    num = 2.0 * (prob * target).sum(1) + eps
    den = prob.pow(power).sum(1) + target.pow(power).sum(1) + eps
    return (1.0 - num / den).mean()


def boundary_weighted_bce_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    boundary_weight: float = 3.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Calibration loss: BCE weighted by ``1 + boundary_weight * band`` plus a squared-denominator soft Dice.

    Args:
        logits: ``[B, 1, H, W]`` low-resolution decoder logits.
        target: binary ``[B, 1, H, W]`` mask at the logits' resolution.
        boundary_weight: lambda_B (boundary pixels weigh ``1 + lambda_B``).
        reduction: ``"mean"`` averages the weighted BCE over pixels so that BCE and Dice have comparable
            magnitudes; ``"sum"`` reproduces the MedCore reference (sum over all pixels, so Dice
            contributes almost nothing and the Fisher scale grows with resolution).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    target = target.to(logits.dtype)
    weight = 1.0 + boundary_weight * boundary_band(target).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none").flatten(1)
    bce = bce.sum(1).mean() if reduction == "sum" else bce.mean()
    return bce + soft_dice_loss(logits, target, squared=True)
