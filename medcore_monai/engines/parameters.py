"""Which parameters a fine-tuning run trains (the optimizer's ``params`` in the bundle)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["SUBMODULES", "prepared_for_training", "trainable_parameters"]

SUBMODULES = ("image_encoder", "prompt_encoder", "mask_decoder")


def _unwrapped(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel keeps the model under .module


def trainable_parameters(network: nn.Module, modules: Sequence[str] = ("image_encoder", "mask_decoder")):
    """Freeze everything outside ``modules`` (and the IoU head) and return the parameters left to train.

    The IoU head never reaches the segmentation loss: training it would only give DDP parameters without
    gradients. Flags inside ``modules`` are kept as they are, so a caller's own freezing (an SVD adaptation that
    trains only singular-value scales) survives.

    Args:
        network: a MedSAM-style module (``image_encoder``, ``prompt_encoder``, ``mask_decoder``), maybe DDP-wrapped.
        modules: names of the submodules to train.

    Raises:
        ValueError: for an unknown submodule name, or when nothing is left to train.
    """
    model = _unwrapped(network)
    unknown = [name for name in modules if name not in SUBMODULES or not hasattr(model, name)]
    if unknown:
        raise ValueError(f"unknown trainable modules {unknown}; choose from {list(SUBMODULES)}")
    for name, param in model.named_parameters():
        inside = any(name.startswith(f"{prefix}.") for prefix in modules)
        if not inside or name.startswith("mask_decoder.iou_prediction_head."):
            param.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"nothing to train: every parameter of {list(modules)} is frozen")
    return params


def prepared_for_training(network: nn.Module, modules: Sequence[str] = ("image_encoder", "mask_decoder")) -> nn.Module:
    """``network`` with everything outside ``modules`` frozen (see :func:`trainable_parameters`), returned.

    DistributedDataParallel must wrap a model whose frozen parameters are already frozen, or it waits for their
    gradients; ``multi_gpu_train.yaml`` builds its DDP module from this.
    """
    trainable_parameters(network, modules)
    return network
