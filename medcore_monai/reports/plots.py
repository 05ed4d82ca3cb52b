"""PNG figures of a pruning run: kept width per block, leverage histograms, budget curves, score scatter.

Every function builds a standalone :class:`matplotlib.figure.Figure` (no pyplot, so no global figure registry,
no backend switch and nothing left open), writes it atomically (temporary file in the target folder, then
``os.replace``, so a reader never sees a half-written PNG) and returns the output path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from ..files import atomic_path

__all__ = [
    "plot_budget_curves",
    "plot_kept_per_block",
    "plot_leverage_histogram",
    "plot_score_scatter",
    "save_figure_atomic",
]

PathLike = str | os.PathLike
_DPI = 120
_METRIC_LABELS = {
    "dice": "Dice",
    "iou": "IoU",
    "bf1": "Boundary F1",
    "hd95": "HD95",
    "hd95_region": "HD95 region",
}
_DISTANCE_METRICS = ("hd95", "hd95_region")
_AXIS_LABELS = {
    "encoder_params": "Encoder parameters",
    "total_params": "Total parameters",
    "encoder_flops": "Encoder FLOPs",
    "total_flops": "Total FLOPs",
}


def save_figure_atomic(figure: Figure, path: PathLike) -> Path:
    """Write ``figure`` as PNG to ``path`` through a temporary file in the same folder.

    Args:
        figure: Figure to save.
        path: Destination (parent folders are created).

    Returns:
        The destination path.
    """
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    return Path(path)


def _as_1d(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def _per_block(values: int | Sequence[int], depth: int) -> np.ndarray:
    """Broadcast a dense width given once (every block the same) to one value per block."""
    array = _as_1d(values)
    return np.full(depth, array[0]) if array.size == 1 else array


# --------------------------------------------------------------------------------------------------
# Kept width per block
# --------------------------------------------------------------------------------------------------


def _kept_bars(axes, kept: np.ndarray, total: np.ndarray, title: str, color: str) -> None:
    blocks = np.arange(kept.size)
    axes.bar(blocks, total, color="none", edgecolor="0.5", linestyle="--", label="dense")
    axes.bar(blocks, kept, color=color, label="kept")
    for block, (k, t) in enumerate(zip(kept, total)):
        axes.annotate(f"{k / t:.0%}" if t else "-", (block, k), ha="center", va="bottom", fontsize=7)
    axes.set_xticks(blocks)
    axes.set_xlabel("Encoder block")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)


def plot_kept_per_block(
    kept_heads: Sequence[int],
    total_heads: int | Sequence[int],
    kept_channels: Sequence[int],
    total_channels: int | Sequence[int],
    path: PathLike,
) -> Path:
    """Two bar charts: attention heads and MLP channels kept per encoder block, over the dense width.

    Args:
        kept_heads: Heads kept in each block.
        total_heads: Dense head count, one per block or a single value for all blocks.
        kept_channels: MLP hidden channels kept in each block.
        total_channels: Dense MLP width, one per block or a single value.
        path: Output PNG.

    Returns:
        The PNG path.
    """
    heads, channels = _as_1d(kept_heads), _as_1d(kept_channels)
    head_totals, channel_totals = _per_block(total_heads, heads.size), _per_block(total_channels, channels.size)
    if head_totals.size != heads.size or channel_totals.size != channels.size:
        raise ValueError("totals must be one value or one value per block")
    figure = Figure(figsize=(max(8.0, 0.6 * heads.size + 2), 6.5), layout="constrained")
    top, bottom = figure.subplots(2, 1)
    _kept_bars(top, heads, head_totals, f"Attention heads kept ({int(heads.sum())}/{int(head_totals.sum())})", "C0")
    _kept_bars(
        bottom,
        channels,
        channel_totals,
        f"MLP channels kept ({int(channels.sum())}/{int(channel_totals.sum())})",
        "C1",
    )
    top.set_ylabel("Heads")
    bottom.set_ylabel("Channels")
    return save_figure_atomic(figure, path)


# --------------------------------------------------------------------------------------------------
# Leverage histogram
# --------------------------------------------------------------------------------------------------


def _shown_ratios(values: Any) -> tuple[np.ndarray, int]:
    """Positive finite ratios (what a log axis can show) and how many were left out."""
    array = _as_1d(values)
    shown = array[(array > 0) & np.isfinite(array)]
    return shown, array.size - shown.size


def plot_leverage_histogram(
    head_ratios: Any,
    mlp_ratios: Any,
    path: PathLike,
    blr95: float | None = None,
    tau: float | None = None,
    n_bins: int = 60,
) -> Path:
    """Log-x histograms of the per-pixel boundary-leverage ratios of head steps and of MLP steps.

    Each family is normalised to fractions of its own pixels, so families with different pixel counts
    compare directly. Zero ratios (no logit change) cannot sit on a log axis; their count goes in the legend.

    Args:
        head_ratios: Pooled ratios of the head-pruning steps (array or tensor).
        mlp_ratios: Pooled ratios of the MLP-pruning steps.
        path: Output PNG.
        blr95: BLR95 to show in the title, if known.
        tau: Band half-width to show in the title, if known.
        n_bins: Number of log-spaced bins shared by both families.

    Returns:
        The PNG path.
    """
    head, head_hidden = _shown_ratios(head_ratios)
    mlp, mlp_hidden = _shown_ratios(mlp_ratios)
    pooled = np.concatenate([head, mlp])
    low, high = (pooled.min(), pooled.max()) if pooled.size else (1e-3, 1.0)
    if high <= low:
        low, high = low / 10.0, high * 10.0
    edges = np.logspace(np.log10(low), np.log10(high), n_bins + 1)
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.subplots()
    for values, hidden, label, color in ((head, head_hidden, "head steps", "C3"), (mlp, mlp_hidden, "MLP steps", "C0")):
        if values.size == 0:
            continue
        suffix = f", {hidden} zero/non-finite not shown" if hidden else ""
        weights = np.full(values.size, 1.0 / values.size)
        label_text = f"{label} (n={values.size}{suffix})"
        axes.hist(values, bins=edges, weights=weights, histtype="stepfilled", alpha=0.45, color=color, label=label_text)
        axes.axvline(np.percentile(values, 95.0), color=color, linestyle="--", linewidth=1, label=f"{label} P95")
    axes.set_xscale("log")
    axes.set_xlabel("|dz| / max(|grad z|, floor) on the boundary band")
    axes.set_ylabel("Fraction of band pixels")
    title = "Boundary leverage per pixel"
    details = [f"tau = {tau:g}" if tau is not None else "", f"BLR95 = {blr95:.3f}" if blr95 is not None else ""]
    details = [d for d in details if d]
    axes.set_title(f"{title} ({', '.join(details)})" if details else title)
    if head.size or mlp.size:
        axes.legend(fontsize=8)
    return save_figure_atomic(figure, path)


# --------------------------------------------------------------------------------------------------
# Budget curves
# --------------------------------------------------------------------------------------------------


def _method_series(rows: Sequence[Mapping[str, Any]], x: str, metric: str) -> dict[str, list[tuple[float, ...]]]:
    """``method -> sorted [(x, value, std)]`` for the rows that have both ``x`` and ``metric``."""
    series: dict[str, list[tuple[float, ...]]] = {}
    for row in rows:
        if row.get(x) is None or row.get(metric) is None:
            continue
        std = row.get(f"{metric}_std")
        point = (float(row[x]), float(row[metric]), float(std) if std is not None else np.nan)
        series.setdefault(str(row.get("method", "method")), []).append(point)
    return {method: sorted(points) for method, points in series.items()}


def _metric_label(metric: str, distance_unit: str) -> str:
    label = _METRIC_LABELS.get(metric, metric)
    return f"{label} ({distance_unit})" if metric in _DISTANCE_METRICS else label


def _plot_metric(axes, rows: Sequence[Mapping[str, Any]], x: str, metric: str, distance_unit: str) -> None:
    for method, points in _method_series(rows, x, metric).items():
        xs, ys, stds = (np.array(column) for column in zip(*points))
        errors = None if np.isnan(stds).all() else np.nan_to_num(stds)
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
    axes.xaxis.set_major_formatter(EngFormatter())
    axes.set_xlabel(_AXIS_LABELS.get(x, x))
    axes.set_ylabel(_metric_label(metric, distance_unit))
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)


def plot_budget_curves(
    rows: Sequence[Mapping[str, Any]],
    path: PathLike,
    x: str = "encoder_params",
    metrics: Sequence[str] = ("bf1", "hd95"),
    distance_unit: str = "px",
) -> Path:
    """Cost (parameters or FLOPs) against boundary metrics across budgets, one line per method.

    Args:
        rows: One dict per (method, budget) with ``method``, the ``x`` key and the metric keys; a
            ``<metric>_std`` key adds error bars. Rows missing ``x`` or a metric are left out of that panel.
        path: Output PNG.
        x: Cost key for the horizontal axis (``encoder_params``, ``encoder_flops``, ...).
        metrics: One panel per metric key.
        distance_unit: Unit of the HD95 values (``px``, ``mm``, or e.g. ``px / mm`` for a macro mean).

    Returns:
        The PNG path.
    """
    if not metrics:
        raise ValueError("metrics must name at least one key")
    figure = Figure(figsize=(5.0 * len(metrics), 4.2), layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, len(metrics)))
    for axes, metric in zip(panels, metrics):
        _plot_metric(axes, rows, x, metric, distance_unit)
        axes.set_title(f"{_METRIC_LABELS.get(metric, metric)} vs {_AXIS_LABELS.get(x, x).lower()}")
    return save_figure_atomic(figure, path)


# --------------------------------------------------------------------------------------------------
# Zero vs reset scores
# --------------------------------------------------------------------------------------------------


_MAX_BLOCK_TICKS = 16  # beyond this (e.g. ViT-H's 32 blocks) every n-th block is labelled


def _is_flat(scores: Any) -> bool:
    """True for one 1-D array/tensor or a sequence of plain numbers (all groups of all blocks in one row)."""
    if isinstance(scores, torch.Tensor | np.ndarray):
        return np.ndim(scores) == 1
    return all(np.ndim(item) == 0 for item in scores)


def _block_arrays(scores: Any) -> list[np.ndarray]:
    """Per-block 1-D arrays from a list of per-block tensors/arrays or a ``[blocks, groups]`` array."""
    return [_as_1d(block) for block in scores]


def _flat_blocks(size: int, blocks: Any, heads_per_block: int | None) -> np.ndarray | None:
    """Block index per point of a flat score array, or None when the flat input does not say."""
    if blocks is not None and heads_per_block is not None:
        raise ValueError("give blocks or heads_per_block, not both")
    if blocks is not None:
        index = _as_1d(blocks)
        if index.size != size or np.any(index < 0) or np.any(index != np.round(index)):
            raise ValueError(f"blocks must give one non-negative integer block index per score ({size} scores)")
        return index.astype(int)
    if heads_per_block is None:
        return None
    if heads_per_block < 1 or size % heads_per_block:
        raise ValueError(f"{size} flat scores do not split into blocks of heads_per_block={heads_per_block}")
    return np.arange(size) // heads_per_block


def _score_points(
    zero_scores: Any, reset_scores: Any, blocks: Any, heads_per_block: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(zero, reset, block index or None)`` per point, from per-block or flat (block-major) inputs."""
    if _is_flat(zero_scores) != _is_flat(reset_scores):
        raise ValueError("zero and reset scores must both be flat or both be per block")
    if not _is_flat(zero_scores):
        if blocks is not None or heads_per_block is not None:
            raise ValueError("blocks/heads_per_block are for flat scores; per-block scores carry their blocks")
        zero, reset = _block_arrays(zero_scores), _block_arrays(reset_scores)
        if [z.size for z in zero] != [r.size for r in reset]:
            raise ValueError("zero and reset scores must have the same per-block sizes")
        block = np.concatenate([np.full(z.size, b) for b, z in enumerate(zero)]) if zero else np.empty(0, int)
        xs = np.concatenate(zero) if zero else np.empty(0)
        ys = np.concatenate(reset) if reset else np.empty(0)
        return xs, ys, block.astype(int)
    xs, ys = _as_1d(zero_scores), _as_1d(reset_scores)
    if xs.size != ys.size:
        raise ValueError(f"zero and reset scores must have the same size ({xs.size} vs {ys.size})")
    return xs, ys, _flat_blocks(xs.size, blocks, heads_per_block)


def _block_colour_bar(figure: Figure, axes, points, depth: int) -> None:
    """A discrete colour bar, one colour per block, ticked at block indices."""
    step = max(1, -(-depth // _MAX_BLOCK_TICKS))
    bar = figure.colorbar(points, ax=axes, label="Encoder block", ticks=np.arange(0, depth, step))
    bar.ax.minorticks_off()


def _score_figure(
    zero_scores: Any,
    reset_scores: Any,
    title: str,
    blocks: Any = None,
    heads_per_block: int | None = None,
) -> Figure:
    """The figure of :func:`plot_score_scatter`, unsaved (tests read its colours back)."""
    xs, ys, block = _score_points(zero_scores, reset_scores, blocks, heads_per_block)
    shown = (xs > 0) & (ys > 0) & np.isfinite(xs) & np.isfinite(ys)
    figure = Figure(figsize=(6.5, 5.5), layout="constrained")
    axes = figure.subplots()
    if shown.any():
        if block is None:
            # no block index known: one colour and no colour bar rather than a made-up block axis
            axes.scatter(xs[shown], ys[shown], color="C0", s=18, alpha=0.85)
        else:
            depth = int(block.max()) + 1  # over all points, so hidden scores do not shrink the block range
            colours = colormaps["viridis"].resampled(depth)
            norm = BoundaryNorm(np.arange(depth + 1) - 0.5, depth)
            points = axes.scatter(xs[shown], ys[shown], c=block[shown], cmap=colours, norm=norm, s=18, alpha=0.85)
            _block_colour_bar(figure, axes, points, depth)
        axes.set_xscale("log")
        axes.set_yscale("log")
    axes.set_xlabel("Zero-intervention score")
    axes.set_ylabel("Reset-intervention score")
    axes.set_title(f"{title} (Pearson r = {_pearson(xs[shown], ys[shown])}, n = {int(shown.sum())})")
    notes = [f"{int((~shown).sum())} non-positive scores not shown" if (~shown).any() else ""]
    notes.append("encoder block unknown (flat scores without blocks/heads_per_block)" if block is None else "")
    text = "\n".join(n for n in notes if n)
    if text:
        axes.text(0.01, 0.99, text, transform=axes.transAxes, va="top", fontsize=8)
    return figure


def plot_score_scatter(
    zero_scores: Any,
    reset_scores: Any,
    path: PathLike,
    title: str = "Head scores",
    *,
    blocks: Any = None,
    heads_per_block: int | None = None,
) -> Path:
    """Zero-intervention against reset-intervention scores (log-log), one colour per encoder block.

    Scores come either per block (a list of 1-D tensors/arrays, or a ``[blocks, groups]`` array), which fixes
    each point's block, or flat (one 1-D array of every block's groups, block-major, e.g. ``torch.cat`` of
    ``GroupScores.heads``). Flat scores need ``blocks`` or ``heads_per_block`` to be coloured by block;
    without either they are drawn in a single colour and without colour bar, since the block of a point is
    then unknown. The colour bar is discrete and ticked at block indices.

    Args:
        zero_scores: Zero-intervention scores, per block or flat, e.g. ``GroupScores.heads`` of
            :func:`~medcore_monai.pruning.zero_scores`.
        reset_scores: Matching reset scores, in the same form.
        path: Output PNG.
        title: Figure title; the Pearson correlation (over all shown groups, raw scores) is appended.
        blocks: For flat scores, the encoder block index of each score.
        heads_per_block: For flat scores of a dense encoder, the (equal) number of groups per block; point
            ``i`` is then in block ``i // heads_per_block``. Give this or ``blocks``, not both.

    Returns:
        The PNG path.

    Raises:
        ValueError: If zero and reset scores do not match in size or form, ``blocks`` does not give one
            non-negative integer per score, flat scores do not split into ``heads_per_block`` groups, both
            ``blocks`` and ``heads_per_block`` are given, or either comes with per-block scores.
    """
    figure = _score_figure(zero_scores, reset_scores, title, blocks=blocks, heads_per_block=heads_per_block)
    return save_figure_atomic(figure, path)


def _pearson(a: np.ndarray, b: np.ndarray) -> str:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return "n/a"
    return f"{np.corrcoef(a, b)[0, 1]:.3f}"
