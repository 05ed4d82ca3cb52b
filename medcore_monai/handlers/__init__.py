"""Ignite handlers of medcore_monai (usable as ``_target_`` in MONAI bundle configs)."""

from medcore_monai.handlers.boundary import HD95, BoundaryF1

__all__ = ["HD95", "BoundaryF1"]
