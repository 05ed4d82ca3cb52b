"""Batch conventions shared by the Ignite engines (calibration, recovery, fine-tuning, evaluation)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

__all__ = ["input_problems", "plain_tensor", "prepare_medsam_batch", "preserved_requires_grad", "raise_problems"]


def plain_tensor(value: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
    """A plain ``torch.Tensor`` on ``device`` (MetaTensor metadata tracking costs time in the model)."""
    tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return tensor.to(device=device, non_blocking=non_blocking) if device is not None else tensor


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


def input_problems(files: Mapping[str, str | None], data_roots: Sequence[str] | None) -> list[str]:
    """What is wrong with a workflow's input files and data roots, every problem at once.

    Args:
        files: ``{setting name: path}`` of required files; ``None`` paths are not checked.
        data_roots: dataset folders or datalists; ``None`` when the workflow reads no data.
    """
    problems = [f"{key} not found: {path}" for key, path in files.items() if path and not Path(path).is_file()]
    if data_roots is not None:
        if not data_roots:
            problems.append("data_roots is empty")
        problems += [f"data root not found: {root}" for root in data_roots if not Path(root).exists()]
    return problems


def raise_problems(problems: Sequence[str], action: str) -> None:
    """Fail before any work with one message listing every problem (nothing when there are none)."""
    if problems:
        raise ValueError(f"cannot start {action}:\n  " + "\n  ".join(problems))
