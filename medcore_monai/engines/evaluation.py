"""Quick box-prompted evaluation at model resolution, for preprocessed batches (demo, pair training, benchmarks).

The bundle's evaluation is MONAI's ``SupervisedEvaluator`` with the metric handlers and
:class:`medcore_monai.inferers.BoxPromptInferer` (native resolution, volumes in mm); this module scores
already preprocessed model-size samples, where that is all a caller has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import compute_boundary_f1, compute_dice, compute_hd95, compute_iou

__all__ = ["METRIC_NAMES", "degraded", "evaluate_model", "segmentation_metrics", "summarise"]

METRIC_NAMES = ("dice", "iou", "bf1", "hd95", "hd95_region")


def segmentation_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, tolerance: float = 2.0
) -> dict[str, float]:
    """All evaluation metrics of one binary prediction (see :mod:`medcore_monai.metrics` for definitions)."""
    return {
        "dice": compute_dice(pred, gt),
        "iou": compute_iou(pred, gt),
        "bf1": compute_boundary_f1(pred, gt, tolerance=tolerance, spacing=spacing),
        "hd95": compute_hd95(pred, gt, spacing=spacing, mode="surface"),
        "hd95_region": compute_hd95(pred, gt, spacing=spacing, mode="region"),
    }


def _names(batch: Mapping[str, Any], count: int) -> list[str]:
    names = batch.get("name")
    if names is None:
        return [""] * count
    return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    data: Iterable[Mapping[str, Any]],
    device: torch.device | str | None = None,
    tolerance: float = 2.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per-image metrics at the model resolution.

    Batches hold ``image`` ``[B, 3, S, S]``, ``label`` ``[B, 1, S, S]`` and ``box`` ``[B, 4]``
    (as produced by :func:`medcore_monai.transforms.medsam_preprocess`). Logits are upsampled
    bilinearly to ``S x S`` and thresholded at 0 (probability 0.5).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    iterator = data
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(data, desc="evaluate", leave=False)
    for batch in iterator:
        images = batch["image"].to(device)
        logits = model(images, torch.as_tensor(batch["box"]).to(device))
        logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        preds = (logits > 0).cpu().numpy()[:, 0]
        labels = (torch.as_tensor(batch["label"]) > 0.5).cpu().numpy()[:, 0]
        for name, pred, gt in zip(_names(batch, len(preds)), preds, labels):
            rows.append({"name": name, **segmentation_metrics(pred, gt, tolerance=tolerance)})
    model.train(was_training)
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of every metric over images (plus ``n``); never silently drops a value."""
    if not rows:
        raise ValueError("no evaluation rows to summarise")
    summary: dict[str, float] = {"n": float(len(rows))}
    for key in METRIC_NAMES:
        values = [float(r[key]) for r in rows if key in r]
        if values:
            if any(math.isnan(v) for v in values):
                raise ValueError(f"metric {key} has NaN values")
            summary[key] = float(np.mean(values))
    return summary


def degraded(samples: Sequence[Mapping[str, Any]], corruption: str, severity: int, seed: int = 0) -> Sequence:
    """``samples`` with their ``image`` corrupted on access (model-size images in [0, 1]).

    Each sample's corruption is seeded from ``(seed, corruption, severity, sample name)``, so results do not
    depend on order, batching or workers. Labels and boxes stay clean: the prompt is what a user would draw.
    """
    from monai.data import Dataset

    from ..transforms.corruptions import Corruptd

    return Dataset(data=samples, transform=Corruptd(keys="image", name=corruption, severity=severity, seed=seed))
