"""Losses of medcore_monai."""

from .boundary import boundary_band, boundary_weighted_bce_dice, soft_dice_loss
from .recovery import RecoveryLossWeights, boundary_complexity, recovery_loss
from .robust import RobustLossWeights, robust_consistency_loss

__all__ = [
    "RecoveryLossWeights",
    "boundary_complexity",
    "recovery_loss",
    "RobustLossWeights",
    "boundary_band",
    "boundary_weighted_bce_dice",
    "robust_consistency_loss",
    "soft_dice_loss",
]
