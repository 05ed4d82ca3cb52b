"""Tensor helpers shared by every layer: plain tensors for the model, and parameter flags kept across a step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

__all__ = ["plain_tensor", "preserved_requires_grad"]


def plain_tensor(value: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
    """A plain ``torch.Tensor`` on ``device`` (MetaTensor metadata tracking costs time in the model)."""
    tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return tensor.to(device=device, non_blocking=non_blocking) if device is not None else tensor


@contextmanager
def preserved_requires_grad(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every parameter's ``requires_grad`` flag on exit.

    Calibration and recovery freeze everything but the encoder while they run; the caller's model must come
    back as it went in, or a later fine-tuning finds its decoder frozen.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
