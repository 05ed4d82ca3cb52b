"""Boundary-leverage analysis: do head-pruning steps move boundaries more than MLP steps.

Scores are computed once; a grid of (head sparsity, MLP sparsity) budgets is applied to the model as
masks, without recovery; the low-resolution logits of the calibration images are recorded for every
grid point; adjacent grid points give head steps and MLP steps whose boundary leverage (95th percentile
of |dz| / |grad z| in the boundary band, per percentage point of encoder parameters removed) is
compared (BLR95, with a bootstrap confidence interval).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..networks.structure import StructuredMasks, attach_masks, count_parameters, encoder_structure
from ..pruning.budget import plan_masks
from ..pruning.cascade import CascadeConfig, score_model
from ..pruning.leverage import analyze_leverage, grid_steps
from .common import plain_tensor

__all__ = ["leverage_grid_logits", "run_leverage_analysis"]


@torch.no_grad()
def _logits(model: nn.Module, samples: Sequence[Mapping[str, Any]], device: torch.device) -> torch.Tensor:
    out = []
    for sample in samples:
        image = plain_tensor(sample["image"], device).float()[None]
        box = plain_tensor(sample["box"], device).float()[None]
        out.append(model(image, box)[0, 0].float().cpu())
    return torch.stack(out)


def leverage_grid_logits(
    model: nn.Module,
    samples: Sequence[Mapping[str, Any]],
    head_scores: Sequence[torch.Tensor],
    channel_scores: Sequence[torch.Tensor],
    sensitivity: torch.Tensor,
    head_levels: Sequence[float],
    mlp_levels: Sequence[float],
    config: CascadeConfig,
    device: torch.device,
) -> tuple[dict[tuple[int, int], torch.Tensor], dict[tuple[int, int], float]]:
    """Logits of every grid configuration and its encoder-parameter reduction in percent."""
    structure = encoder_structure(model.image_encoder)
    dense = count_parameters(model.image_encoder)
    logits, reduction = {}, {}
    for i, h in enumerate(head_levels):
        for j, m in enumerate(mlp_levels):
            masks, _ = plan_masks(
                StructuredMasks.full(structure),
                head_scores,
                channel_scores,
                sensitivity,
                head_sparsity=h,
                mlp_sparsity=m,
                min_keep_heads=config.min_keep_heads,
                min_keep_mlp_fraction=config.min_keep_mlp_fraction,
                protected=config.protected_blocks,
                warn=False,  # grid points beyond the floors are expected; their steps are discarded
            )
            removed = sum(
                int((~hm).sum()) * b.params_per_head + int((~cm).sum()) * b.params_per_channel
                for b, hm, cm in zip(structure, masks.heads, masks.channels)
            )
            with attach_masks(model.image_encoder, masks):
                logits[(i, j)] = _logits(model, samples, device)
            reduction[(i, j)] = 100.0 * removed / dense
    return logits, reduction


def run_leverage_analysis(
    model: nn.Module,
    calibration: Mapping[str, Sequence[Mapping[str, Any]]],
    config: CascadeConfig = CascadeConfig(),
    reference_model: nn.Module | None = None,
    head_levels: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    mlp_levels: Sequence[float] = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95),
    tau: float = 3.0,
    device: torch.device | str | None = None,
    output_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    progress: bool = True,
    precomputed: tuple | None = None,
) -> dict[str, Any]:
    """BLR95 of ``model`` on the calibration images (the model is left unchanged).

    ``precomputed`` takes ``score_model``'s ``(scores, details, sensitivity)`` for this model and
    calibration, so a pruning run that also prunes with them scores only once.

    Returns:
        ``{"tau", "summary", "head_steps", "mlp_steps", "grid"}``; with ``output_dir`` also writes
        ``leverage.json`` and ``leverage_histogram.png`` there.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if precomputed is None:
        precomputed = score_model(model, calibration, config, reference_model, device, progress)
    scores, _, sensitivity = precomputed
    samples = [s for group in calibration.values() for s in group]
    gt = torch.stack([plain_tensor(s["label_lowres"])[0] > 0.5 for s in samples]).numpy()
    logits, reduction = leverage_grid_logits(
        model, samples, scores.heads, scores.channels, sensitivity, head_levels, mlp_levels, config, device
    )
    steps = grid_steps(len(head_levels), len(mlp_levels))

    def as_steps(pairs):
        return [(logits[a], logits[b], reduction[b] - reduction[a]) for a, b in pairs]

    result = analyze_leverage(
        as_steps(steps.head), as_steps(steps.mlp), gt, tau, pairs=steps.pairs, n_bootstrap=n_bootstrap, keep_ratios=True
    )
    head_ratios, mlp_ratios = result.pop("head_ratios"), result.pop("mlp_ratios")
    result["grid"] = {
        "head_levels": list(head_levels),
        "mlp_levels": list(mlp_levels),
        "param_reduction_pct": [[reduction[(i, j)] for j in range(len(mlp_levels))] for i in range(len(head_levels))],
    }
    if output_dir is not None:
        _write_outputs(Path(output_dir), result, head_ratios, mlp_ratios, tau)
    return result


def _write_outputs(folder: Path, result: dict[str, Any], head_ratios, mlp_ratios, tau: float) -> None:
    from ..files import write_json_atomic
    from ..reports import plot_leverage_histogram

    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "leverage.json", result)
    plot_leverage_histogram(
        head_ratios, mlp_ratios, folder / "leverage_histogram.png", blr95=result["summary"]["blr95"], tau=tau
    )
