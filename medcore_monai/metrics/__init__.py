"""Boundary and region metrics of medcore_monai: functional API and MONAI metric classes."""

from medcore_monai.metrics.boundary import (
    compute_boundary_f1,
    compute_dice,
    compute_hd95,
    compute_iou,
    compute_surface_distances,
    image_diagonal,
    inner_contour,
    normalize_spacing,
    to_binary_numpy,
)
from medcore_monai.metrics.cumulative import BoundaryF1Metric, HD95Metric

__all__ = [
    "BoundaryF1Metric",
    "HD95Metric",
    "compute_boundary_f1",
    "compute_dice",
    "compute_hd95",
    "compute_iou",
    "compute_surface_distances",
    "image_diagonal",
    "inner_contour",
    "normalize_spacing",
    "to_binary_numpy",
]
