"""Box-prompted evaluation of a MedSAM-style model: Dice, IoU, boundary F1 and HD95 per image."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader
from torch import nn

from ..data.datasets import is_volumetric, preprocess_split
from ..metrics import compute_boundary_f1, compute_dice, compute_hd95, compute_iou

__all__ = [
    "METRIC_NAMES",
    "degraded",
    "evaluate_items",
    "evaluate_model",
    "evaluate_volumes",
    "predict_native",
    "segmentation_metrics",
    "slices_to_volumes",
    "summarise",
]

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


@torch.no_grad()
def predict_native(model: nn.Module, sample: Mapping[str, Any], device: torch.device) -> np.ndarray:
    """Binary prediction of one preprocessed sample at its native (original) height and width."""
    image = torch.as_tensor(sample["image"]).to(device).float()[None]
    box = torch.as_tensor(sample["box"]).to(device).float()[None]
    height, width = (int(v) for v in torch.as_tensor(sample["original_shape"]).tolist())
    logits = F.interpolate(model(image, box).float(), size=(height, width), mode="bilinear", align_corners=False)
    return (logits[0, 0] > 0).cpu().numpy()


def slices_to_volumes(
    items: Sequence[Mapping[str, Any]], predictions: Sequence[np.ndarray]
) -> dict[str, tuple[Mapping[str, Any], np.ndarray]]:
    """Put slice predictions back into volumes shaped like their source NIfTI (slices without a prompt stay 0).

    Returns:
        ``{volume: (first item of the volume, uint8 prediction volume)}``.
    """
    import nibabel as nib

    volumes: dict[str, tuple[Mapping[str, Any], np.ndarray]] = {}
    for item, pred in zip(items, predictions):
        if item["volume"] not in volumes:
            shape = nib.load(item["label_path"]).shape[:3]
            volumes[item["volume"]] = (item, np.zeros(shape, dtype=np.uint8))
        volume = volumes[item["volume"]][1]
        index = [slice(None)] * 3
        index[int(item.get("slice_axis", 2))] = int(item["slice_index"])
        volume[tuple(index)] = pred.astype(np.uint8)
    return volumes


def evaluate_volumes(
    model: nn.Module,
    items: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    device: torch.device,
    label_value: int | None = None,
    tolerance_mm: float = 2.0,
) -> list[dict[str, Any]]:
    """Per-volume metrics in millimetres for slices of NIfTI volumes.

    Each prompted slice is predicted at its native resolution; predictions are stacked into the volume
    (unprompted slices predict nothing) and compared in 3D with the full label volume, using the voxel
    spacing from the NIfTI header. BF1's tolerance is ``tolerance_mm`` millimetres.
    """
    import nibabel as nib

    model.eval()
    predictions = [predict_native(model, samples[i], device) for i in range(len(samples))]
    rows = []
    for volume, (item, prediction) in slices_to_volumes(items, predictions).items():
        label_image = nib.load(item["label_path"])
        label = np.rint(np.asarray(label_image.dataobj)).astype(np.int64)
        truth = label == label_value if label_value is not None else label > 0
        spacing = tuple(float(z) for z in label_image.header.get_zooms()[:3])
        metrics = segmentation_metrics(prediction, truth, spacing=spacing, tolerance=tolerance_mm)
        rows.append({"name": volume, **metrics})
    return rows


def degraded(samples: Sequence[Mapping[str, Any]], corruption: str, severity: int, seed: int = 0) -> Sequence:
    """``samples`` with their ``image`` corrupted on access (model-size images in [0, 1]).

    Each sample's corruption is seeded from ``(seed, corruption, severity, sample name)``, so results do not
    depend on order, batching or workers. Labels and boxes stay clean: the prompt is what a user would draw.
    """
    from monai.data import Dataset

    from ..transforms.corruptions import Corruptd

    return Dataset(data=samples, transform=Corruptd(keys="image", name=corruption, severity=severity, seed=seed))


def evaluate_items(
    model: nn.Module,
    items: Sequence[dict[str, Any]],
    device: torch.device,
    seed: int,
    bbox_shift: int,
    label_value: int | None,
    progress: bool = False,
    corruption: tuple[str, int] | None = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per-image metrics at model resolution, or per-volume metrics in mm for slices of NIfTI volumes.

    Args:
        model: a MedSAM-style module.
        items: data items of one dataset.
        device: where the model runs.
        seed: box-jitter and corruption seed.
        bbox_shift: maximum box jitter per side (model pixels).
        label_value: foreground label of multi-label masks.
        progress: progress bar (2D data).
        corruption: ``(name, severity)`` to evaluate on degraded images (see :func:`degraded`).
        samples: the preprocessed ``items`` when the caller already has them (several corruptions).
    """
    if samples is None:
        samples = preprocess_split(items, model.img_size, bbox_shift, seed, label_value)
    if corruption is not None:
        samples = degraded(samples, *corruption, seed=seed)
    if is_volumetric(items):
        return evaluate_volumes(model, items, samples, device, label_value)
    return evaluate_model(model, DataLoader(samples, batch_size=1), device, progress=progress)
