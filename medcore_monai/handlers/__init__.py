"""Ignite handlers of medcore_monai (usable as ``_target_`` in MONAI bundle configs)."""

from medcore_monai.handlers.boundary import HD95, BoundaryF1
from medcore_monai.handlers.tensorboard import attach_tensorboard

__all__ = ["HD95", "BoundaryF1", "attach_tensorboard"]
