"""Batch conventions shared by the Ignite engines (calibration, recovery, fine-tuning, evaluation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..tensors import plain_tensor, preserved_requires_grad

__all__ = ["plain_tensor", "prepare_medsam_batch", "preserved_requires_grad"]


def prepare_medsam_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **_: Any
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor], dict[str, Any]]:
    """``prepare_batch`` for MONAI engines driving :class:`~medcore_monai.networks.MedSAM`.

    Returns ``(images, label_lowres, (boxes,), {})`` so that MONAI's ``SupervisedTrainer`` /
    ``SupervisedEvaluator`` call ``network(images, boxes)`` and compare the low-resolution logits with
    ``label_lowres``.
    """
    images = plain_tensor(batchdata["image"], device, non_blocking).float()
    target = plain_tensor(batchdata["label_lowres"], device, non_blocking).float()
    boxes = plain_tensor(batchdata["box"], device, non_blocking).float()
    return images, target, (boxes,), {}
