"""Batch conventions shared by the Ignite engines (calibration, recovery, fine-tuning, evaluation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..tensors import plain_tensor, preserved_requires_grad

__all__ = ["input_problems", "plain_tensor", "prepare_medsam_batch", "preserved_requires_grad", "raise_problems"]


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
