"""What a model costs: parameters, measured FLOPs and latency of one box-prompted forward."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import benchmark

from ..networks.structure import count_parameters, measure_flops

__all__ = ["measure_latency", "model_cost"]


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def model_cost(model: nn.Module) -> dict[str, int]:
    """Parameters and measured FLOPs (batch 1, one box) of the encoder and of the whole MedSAM-style model."""
    model = _unwrapped(model)
    size = model.img_size
    box = torch.tensor([[0.0, 0.0, size / 2, size / 2]])
    total_flops, per_module = measure_flops(model, torch.zeros(1, 3, size, size), box)
    return {
        "encoder_params": count_parameters(model.image_encoder),
        "total_params": count_parameters(model),
        # one counted forward gives both; the encoder's share is its submodule entry
        "encoder_flops": per_module[f"{type(model).__name__}.image_encoder"],
        "total_flops": total_flops,
    }


@torch.no_grad()
def measure_latency(model: nn.Module, device: torch.device | str, min_run_time: float = 0.5) -> dict[str, float]:
    """Median seconds per image (batch 1) of the encoder and of the prompt decoding, measured separately.

    ``total_s`` is their sum, so it can never come out below ``encoder_s`` through timing noise. Uses
    ``torch.utils.benchmark.Timer`` (warm-up, CUDA synchronisation, adaptive repeat count).
    """
    model = _unwrapped(model).eval()
    device = torch.device(device)
    size = model.img_size
    image = torch.rand(1, 3, size, size, device=device)
    box = torch.tensor([[size * 0.25, size * 0.25, size * 0.75, size * 0.75]], device=device)
    embedding = model.encode(image)
    scope = {"model": model, "image": image, "box": box, "embedding": embedding}
    encoder = benchmark.Timer("model.encode(image)", globals=scope).blocked_autorange(min_run_time=min_run_time)
    decoder = benchmark.Timer("model.decode(embedding, box)", globals=scope).blocked_autorange(
        min_run_time=min_run_time
    )
    return {
        "encoder_s": float(encoder.median),
        "decoder_s": float(decoder.median),
        "total_s": float(encoder.median + decoder.median),
        "device": str(device),
    }
