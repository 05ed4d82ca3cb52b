"""A PNG grid of RobustMedSAM's 12 corruptions at a few severities, for docs and sanity checks."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..files import atomic_path
from ..transforms.corruptions import CORRUPTIONS, corrupt, severity_parameters

__all__ = ["plot_corruption_grid", "plot_robustness_heatmap"]

PathLike = str | os.PathLike
_PANEL_INCHES = 1.2
_FONT_SIZE = 7
_RGB = 3
HEATMAP_DPI = 110
_HEATMAP_CELL_INCHES = (1.1, 0.38)  # (per severity column, per corruption row)
_HEATMAP_MARGIN_INCHES = (3.6, 1.35)  # corruption names + colour bar; title + severity axis
_HEATMAP_MIN_INCHES = (6.4, 2.6)


def _range(value: tuple[float, float], fmt: str = "g") -> str:
    low, high = value
    return f"{low:{fmt}}" if low == high else f"{low:{fmt}}–{high:{fmt}}"


def _parameter_label(name: str, severity: int) -> str:
    """A short caption of the parameters of one panel (intensities on the 0–255 scale)."""
    p = severity_parameters(name, severity)
    labels = {
        "gauss_noise": lambda: f"σ={p['std_255']:g}",
        "gaussian_blur": lambda: f"k={_range((min(p['kernel_sizes']), max(p['kernel_sizes'])))}",
        "contrast": lambda: f"×{_range(p['factor_range'])} @128",
        "brightness": lambda: f"×{_range(p['factor_range'])}",
        "compression": lambda: f"q={_range(p['quality_range'])}",
        "color_jitter": lambda: f"{p['brightness']:g}/{p['contrast']:g}/{p['saturation']:g}/{p['hue']:g}",
        "poisson_noise": lambda: f"c={p['scale']:g}",
        "speckle_noise": lambda: f"var={p['variance']:g}",
        "salt_pepper_noise": lambda: f"{100 * p['amount']:g} %",
        "rician_noise": lambda: f"σ={p['std_255']:g}",
        "rayleigh_noise": lambda: f"s={p['scale_255']:g}",
        "step_motion": lambda: f"shift {p['shift_px']} px",
    }
    return labels[name]()


def _as_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        plain = image.as_tensor() if hasattr(image, "as_tensor") else image
        return plain.detach().to("cpu", torch.float32).numpy()
    return np.asarray(image, dtype=np.float32)


def _show(axis, image: np.ndarray) -> None:
    """Draw a ``[C, H, W]`` image in [0, 1] without ticks (RGB for 3 channels, else the first in grey)."""
    if image.shape[0] == _RGB:
        axis.imshow(np.moveaxis(image, 0, -1), vmin=0.0, vmax=1.0)
    else:
        axis.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0)
    axis.set_xticks([])
    axis.set_yticks([])


def plot_corruption_grid(
    image: np.ndarray | torch.Tensor,
    out_path: PathLike,
    severities: Sequence[int] = (1, 3, 5),
    seed: int = 0,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write a grid of the clean image and its 12 corruptions, one row per severity, as PNG.

    Every panel uses the same ``seed`` (see :func:`~medcore_monai.transforms.corruptions.corrupt`), so
    the rows of one corruption differ only in strength. The file is written atomically.

    Args:
        image: Channel-first ``[C, H, W]`` float image in [0, 1] (numpy, tensor or MetaTensor).
        out_path: Destination PNG (parent folders are created).
        severities: Severities to show, one row each.
        seed: Corruption seed.
        title: Optional figure title.
        dpi: Resolution of the PNG.

    Returns:
        The destination path.

    Raises:
        ValueError: For an invalid image or severity (see :func:`corrupt`).
    """
    array = _as_array(image)
    severities = tuple(severities)
    if not severities:
        raise ValueError("severities must not be empty")
    columns = 1 + len(CORRUPTIONS)
    figure = Figure(
        figsize=(columns * _PANEL_INCHES, len(severities) * (_PANEL_INCHES + 0.25) + (0.5 if title else 0.3)),
        layout="constrained",
    )
    axes = figure.subplots(len(severities), columns, squeeze=False)
    for row, severity in enumerate(severities):
        panels = [("clean", array, "")] + [
            (name, corrupt(array, name, severity, seed), _parameter_label(name, severity)) for name in CORRUPTIONS
        ]
        for column, (name, panel, caption) in enumerate(panels):
            axis = axes[row, column]
            _show(axis, panel)
            axis.set_xlabel(caption, fontsize=_FONT_SIZE - 1, labelpad=1)
            if row == 0:
                axis.set_title(name.replace("_noise", "\nnoise").replace("_", " "), fontsize=_FONT_SIZE)
        axes[row, 0].set_ylabel(f"severity {severity}", fontsize=_FONT_SIZE + 1)
    if title:
        figure.suptitle(title, fontsize=_FONT_SIZE + 2)
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return Path(out_path)


def _heatmap_size(n_corruptions: int, n_severities: int) -> tuple[float, float]:
    """Figure inches for a ``corruptions x severities`` heatmap: cells of fixed size plus room for the text.

    The fixed part holds the corruption names, the colour bar and the title; a floor keeps a 1x1 table
    readable (the title alone needs a few inches).
    """
    width = _HEATMAP_MARGIN_INCHES[0] + _HEATMAP_CELL_INCHES[0] * n_severities
    height = _HEATMAP_MARGIN_INCHES[1] + _HEATMAP_CELL_INCHES[1] * n_corruptions
    return max(width, _HEATMAP_MIN_INCHES[0]), max(height, _HEATMAP_MIN_INCHES[1])


def _wrapped_title(title: str, width_inches: float, font_size: float) -> str:
    """``title`` broken into lines that fit ``width_inches`` (a long custom title would be cut otherwise)."""
    # an average glyph is ~0.55 em wide; one em is font_size points and 72 points make an inch
    columns = max(20, int(width_inches * 72 / (0.55 * font_size)) - 4)
    return "\n".join(textwrap.wrap(title, columns)) or title


def heatmap_figure(
    table: dict[str, dict[int, float]],
    metric: str = "Dice",
    clean: float | None = None,
    title: str | None = None,
) -> Figure:
    """The unsaved figure of :func:`plot_robustness_heatmap`, at the DPI it is saved with.

    Args:
        table: ``{corruption: {severity: value}}`` (missing cells are left blank).
        metric: Metric name for the colour bar and title.
        clean: The clean-image value, shown in the title for reference.
        title: Figure title (default: built from ``metric`` and ``clean``).

    Returns:
        The figure (``layout="constrained"``, so labels and title are laid out inside it on drawing).

    Raises:
        ValueError: For an empty table.
    """
    if not table:
        raise ValueError("robustness table is empty")
    names = list(table)
    severities = sorted({int(s) for row in table.values() for s in row})
    values = np.array([[table[n].get(s, np.nan) for s in severities] for n in names], dtype=float)
    size = _heatmap_size(len(names), len(severities))
    figure = Figure(figsize=size, dpi=HEATMAP_DPI, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            axes.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=_FONT_SIZE + 1, color="white")
    axes.set_xticks(range(len(severities)), [str(s) for s in severities], fontsize=_FONT_SIZE + 1)
    axes.set_yticks(range(len(names)), names, fontsize=_FONT_SIZE + 1)
    axes.set_xlabel("severity")
    axes.set_ylabel("corruption")
    figure.colorbar(image, ax=axes, label=metric)
    suffix = f" (clean {clean:.3f})" if clean is not None else ""
    title_size = _FONT_SIZE + 3
    # a figure-level title is placed by constrained layout above everything, so it cannot be clipped vertically
    figure.suptitle(
        _wrapped_title(title or f"{metric} under corruption{suffix}", size[0], title_size), fontsize=title_size
    )
    return figure


def plot_robustness_heatmap(
    table: dict[str, dict[int, float]],
    out_path: PathLike,
    metric: str = "Dice",
    clean: float | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of one metric per corruption (rows) and severity (columns), annotated with the values.

    The figure grows with the table (fixed cell size; 12 corruptions x 3 severities give about
    770 x 650 px) and never goes below a readable minimum; title and labels stay inside the image.

    Args:
        table: ``{corruption: {severity: value}}`` (missing cells are left blank).
        out_path: Output PNG (written atomically).
        metric: Metric name for the colour bar and title.
        clean: The clean-image value, shown in the title for reference.
        title: Figure title (default: built from ``metric`` and ``clean``).

    Returns:
        The PNG path.

    Raises:
        ValueError: For an empty table.
    """
    figure = heatmap_figure(table, metric=metric, clean=clean, title=title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png", dpi=HEATMAP_DPI)
    return out_path
