"""RobustSAM's training loss: segmentation of the degraded view plus clean-vs-degraded consistency."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

__all__ = ["RobustLossWeights", "robust_consistency_loss"]


@dataclass(frozen=True)
class RobustLossWeights:
    """Weights of the four terms (RobustSAM's and RobustMedSAM's: focal 20, Dice 1, token 2, features 100)."""

    focal: float = 20.0
    dice: float = 1.0
    token: float = 2.0
    features: float = 100.0


_FOCAL = FocalLoss(gamma=2.0, alpha=0.25, use_softmax=False)
_DICE = DiceLoss(sigmoid=True)


def robust_consistency_loss(
    degraded_logits: torch.Tensor,
    target: torch.Tensor,
    degraded_features: torch.Tensor,
    clean_features: torch.Tensor,
    degraded_token: torch.Tensor,
    clean_token: torch.Tensor,
    weights: RobustLossWeights = RobustLossWeights(),
) -> dict[str, torch.Tensor]:
    """The loss of one batch and its terms.

    Args:
        degraded_logits: mask logits of the degraded images ``[B, 1, h, w]``.
        target: binary masks ``[B, 1, h, w]``.
        degraded_features: robust mask features of the degraded images (robust mode).
        clean_features: the same features of the clean images (clear mode), the consistency target.
        degraded_token: robust output token of the degraded images.
        clean_token: output token of the clean images.
        weights: term weights.

    Returns:
        ``{"loss", "focal", "dice", "token", "features"}``.
    """
    terms = {
        "focal": _FOCAL(degraded_logits, target),
        "dice": _DICE(degraded_logits, target),
        "token": F.mse_loss(degraded_token, clean_token),
        "features": F.mse_loss(degraded_features, clean_features),
    }
    terms["loss"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms
