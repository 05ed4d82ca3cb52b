"""Losses of medcore_monai."""

from .boundary import boundary_band, boundary_weighted_bce_dice, soft_dice_loss

__all__ = ["boundary_band", "boundary_weighted_bce_dice", "soft_dice_loss"]
