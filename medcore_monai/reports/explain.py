"""Figures of the explain workflow: attribution heat maps per method, and dense vs pruned vs their difference.

Images arrive in flow space (``[C, S, S]`` in [-1, 1]); boxes in flow pixels; maps are ``[S, S]`` per pixel.
Heat maps use a diverging colour scale symmetric about zero (red: raises the target, blue: lowers it), drawn over
the grey image, with the model's mask contour and the box.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .plots import save_figure_atomic

__all__ = ["plot_method_maps", "plot_compression"]

_TITLES = {
    "transport": "transport path",
    "ig_black": "IG, black baseline",
    "ig_blur": "IG, blurred baseline",
    "gradient_shap": "GradientSHAP",
    "occlusion": "occlusion (MONAI)",
}


def _display(image: torch.Tensor) -> np.ndarray:
    picture = ((image.detach().cpu().float() + 1.0) / 2.0).clamp(0, 1)
    return picture[0].numpy() if picture.shape[0] == 1 else picture.permute(1, 2, 0).numpy()


def _base(axes, image: torch.Tensor, box: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> None:
    axes.imshow(_display(image), cmap="gray", vmin=0, vmax=1, alpha=alpha)
    if bool(mask.any()):
        axes.contour(mask.cpu().float().numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
    x0, y0, x1, y1 = (float(v) for v in box)
    axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=0.8))
    axes.set_xticks([])
    axes.set_yticks([])


def _heat(axes, figure: Figure, values: torch.Tensor, limit: float) -> None:
    shown = axes.imshow(values.detach().cpu().float().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.7)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)


def _limit(*maps: torch.Tensor) -> float:
    return max(max(float(m.abs().max()) for m in maps), 1e-12)


def plot_method_maps(
    image: torch.Tensor,
    box: torch.Tensor,
    mask: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    metrics: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
) -> Path:
    """One row: the image with box and mask, then each method's map with its deletion/insertion AUC."""
    figure = Figure(figsize=(3.2 * (len(maps) + 1), 3.2), layout="constrained")
    axes = figure.subplots(1, len(maps) + 1, squeeze=False)[0]
    _base(axes[0], image, box, mask)
    axes[0].set_title("image, box, mask", fontsize=9)
    for ax, (name, values) in zip(axes[1:], maps.items()):
        _base(ax, image, box, mask, alpha=0.6)
        _heat(ax, figure, values, _limit(values))
        numbers = metrics.get(name, {})
        ax.set_title(
            f"{_TITLES.get(name, name)}\ndel {numbers.get('deletion_auc', float('nan')):.3f}  "
            f"ins {numbers.get('insertion_auc', float('nan')):.3f}",
            fontsize=9,
        )
    return save_figure_atomic(figure, path)


def plot_compression(
    image: torch.Tensor,
    box: torch.Tensor,
    mask: torch.Tensor,
    band: torch.Tensor,
    compression: Mapping[str, Any],
    path: str | os.PathLike,
) -> Path:
    """Dense and pruned transport attributions on one colour scale, and their difference with the boundary band."""
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    axes = figure.subplots(1, 4)
    _base(axes[0], image, box, mask)
    axes[0].set_title("image, box, dense mask", fontsize=9)
    limit = _limit(compression["dense"], compression["pruned"])
    for ax, key, title in ((axes[1], "dense", "dense"), (axes[2], "pruned", "pruned")):
        _base(ax, image, box, mask, alpha=0.6)
        _heat(ax, figure, compression[key], limit)
        ax.set_title(f"{title}: target {compression[f'{key}_target_value']:.3f}", fontsize=9)
    _base(axes[3], image, box, mask, alpha=0.6)
    _heat(axes[3], figure, compression["difference"], _limit(compression["difference"]))
    if bool(band.any()):
        axes[3].contour(band.cpu().float().numpy(), levels=[0.5], colors="black", linewidths=0.6, linestyles="dotted")
    axes[3].set_title(
        f"pruned - dense\n{100 * compression['difference_band_mass']:.0f} % of |diff| in the boundary band "
        f"({100 * compression['band_area_fraction']:.0f} % of the area)",
        fontsize=9,
    )
    return save_figure_atomic(figure, path)
