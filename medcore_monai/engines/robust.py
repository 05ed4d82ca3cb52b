"""RobustSAM-style decoder training: each image is seen clean and degraded, and the two must agree.

:func:`consistency_objective` gives the trainer's network, loss and ``prepare_batch`` (bundle/configs/finetune.yaml
with ``consistency_loss: true``). Batches carry the degraded image under ``image`` and the clean one under
``image_clean`` (``RandCorruptiond(clean_key=...)``).
The clean view is decoded in clear mode without gradients and serves as the target of the degraded view's
robust mask features and output token (MSE), next to focal + Dice segmentation of the degraded view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..losses.robust import RobustLossWeights, robust_consistency_loss
from ..networks.medsam import RobustMedSAM
from .common import plain_tensor
from .finetune import FinetuneObjective

__all__ = ["CLEAN_KEY", "CleanDegradedPair", "consistency_objective", "prepare_pair_batch"]

CLEAN_KEY = "image_clean"


def prepare_pair_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **_: Any
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor], dict[str, Any]]:
    """``(degraded ++ clean images [B, 6, S, S], label_lowres, (boxes,), {})`` for MONAI's engines."""
    if CLEAN_KEY not in batchdata:
        hint = "RandCorruptiond(clean_key=...)"
        raise KeyError(f"consistency training needs the clean image under {CLEAN_KEY!r} ({hint})")
    degraded = plain_tensor(batchdata["image"], device, non_blocking).float()
    clean = plain_tensor(batchdata[CLEAN_KEY], device, non_blocking).float()
    target = plain_tensor(batchdata["label_lowres"], device, non_blocking).float()
    boxes = plain_tensor(batchdata["box"], device, non_blocking).float()
    return torch.cat([degraded, clean], dim=1), target, (boxes,), {}


class CleanDegradedPair(nn.Module):
    """Decodes the degraded half of a paired batch in robust mode and the clean half in clear mode.

    Returns ``(degraded logits, degraded features, clean features, degraded token, clean token)``, the
    arguments of :func:`~medcore_monai.losses.robust_consistency_loss` after the target.
    """

    def __init__(self, model: RobustMedSAM) -> None:
        super().__init__()
        if not isinstance(model, RobustMedSAM):
            raise TypeError("consistency training needs a RobustMedSAM (a model with a RobustSAM decoder)")
        # under ``module``, DDP's name, so checkpoint and parameter helpers that unwrap ``.module`` find the model
        self.module = model

    def forward(self, pair: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Outputs of both views (see the class docstring)."""
        degraded, clean = pair[:, :3], pair[:, 3:]
        with torch.no_grad():
            target = self.module.robust_outputs(clean, boxes, robust=False)
        out = self.module.robust_outputs(degraded, boxes, robust=True)
        return out.masks, out.robust_embeddings, target.robust_embeddings, out.robust_token, target.robust_token


def consistency_objective(model: RobustMedSAM, weights: RobustLossWeights | None = None) -> FinetuneObjective:
    """RobustSAM's loss (focal 20, Dice 1, token MSE 2, feature MSE 100 by default) as a fine-tuning objective."""
    weights = weights or RobustLossWeights()

    def loss(pred: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        logits, features, clean_features, token, clean_token = pred
        return robust_consistency_loss(logits, target, features, clean_features, token, clean_token, weights)["loss"]

    return FinetuneObjective(network=CleanDegradedPair(model), loss=loss, prepare_batch=prepare_pair_batch)
