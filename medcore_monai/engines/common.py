"""Batch conventions and steps shared by the Ignite engines (calibration, recovery, fine-tuning, evaluation)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Engine

from ..tensors import plain_tensor, preserved_requires_grad

__all__ = ["clip_gradients", "plain_tensor", "prepare_medsam_batch", "preserved_requires_grad"]


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


def clip_gradients(engine: Engine, parameters: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Clip the total gradient norm of ``parameters`` after a backward pass of ``engine``, unscaled first under AMP.

    Under AMP the gradients are still multiplied by the loss scale here; the engine's scaler remembers the
    unscaling, so its ``step()`` does not unscale again.
    """
    if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
        engine.scaler.unscale_(engine.optimizer)
    torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
