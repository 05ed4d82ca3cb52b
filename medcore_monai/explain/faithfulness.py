"""Deletion and insertion curves: how fast the target moves when pixels go in the order an attribution ranks them.

Pixels (all channels of a position together) are ranked by their attribution, largest first. Deletion replaces
the top fraction of the image with a removal image (by default the image blurred, so removed pixels do not
become an out-of-range colour); insertion starts from the removal image and puts the top fraction back. Each
curve is the target at ``fractions`` from 0 to 1 and its area is the trapezoid rule over the fraction. A faithful
map gives a low deletion AUC (the target falls fast) and a high insertion AUC.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .attribution import Target

__all__ = ["FaithfulnessCurves", "removal_image", "deletion_insertion"]


@dataclasses.dataclass
class FaithfulnessCurves:
    """Target values along deletion and insertion, with their areas over the removed/inserted fraction."""

    fractions: list[float]
    deletion: list[float]
    insertion: list[float]

    @property
    def deletion_auc(self) -> float:
        """Area under the deletion curve (lower: the ranking finds what the target needs)."""
        return _trapezoid(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> float:
        """Area under the insertion curve (higher is better)."""
        return _trapezoid(self.fractions, self.insertion)


def _trapezoid(x: list[float], y: list[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2.0 for i in range(len(x) - 1)))


def removal_image(image: torch.Tensor, mode: str = "blur", sigma: float = 4.0) -> torch.Tensor:
    """What removed pixels become: the image Gaussian-blurred (``blur``) or black (``black``, -1 in flow space)."""
    if mode == "black":
        return torch.full_like(image, -1.0)
    if mode != "blur":
        raise ConfigError(f"unknown removal {mode!r}; use 'blur' or 'black'")
    radius = max(1, int(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = image[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


@torch.no_grad()
def deletion_insertion(
    target: Target,
    image: torch.Tensor,
    saliency: torch.Tensor,
    removal: torch.Tensor,
    steps: int = 16,
    batch_size: int = 16,
) -> FaithfulnessCurves:
    """Deletion and insertion curves of ``target`` for a per-pixel ``saliency`` ``[S, S]`` of ``image`` ``[C, S, S]``.

    Ties keep raster order (a stable sort), so equal saliencies are removed in a reproducible order.
    """
    if saliency.shape != image.shape[-2:]:
        raise ValueError(f"saliency {tuple(saliency.shape)} must match the image's {tuple(image.shape[-2:])}")
    order = torch.sort(saliency.flatten(), descending=True, stable=True).indices
    pixels = order.numel()
    fractions = [i / steps for i in range(steps + 1)]
    masks = torch.zeros(steps + 1, pixels, dtype=image.dtype, device=image.device)
    for i, fraction in enumerate(fractions):
        masks[i, order[: round(fraction * pixels)]] = 1.0
    masks = masks.view(steps + 1, 1, *image.shape[-2:])
    deleted = image[None] * (1 - masks) + removal[None] * masks
    inserted = removal[None] * (1 - masks) + image[None] * masks
    values = [target(chunk) for chunk in torch.cat([deleted, inserted]).split(batch_size)]
    values = torch.cat(values).tolist()
    return FaithfulnessCurves(fractions, values[: steps + 1], values[steps + 1 :])
