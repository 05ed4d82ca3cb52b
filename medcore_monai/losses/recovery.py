"""Recovery objective after a pruning step: segmentation + boundary + distillation + high-frequency terms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .boundary import boundary_band

__all__ = ["RecoveryLossWeights", "recovery_loss", "intermediate_gap", "boundary_complexity"]


@dataclass(frozen=True)
class RecoveryLossWeights:
    """Weights of the recovery terms (defaults are MedCore's).

    Attributes:
        boundary: lambda_1, weight of the boundary-weighted BCE.
        feature: lambda_2, image-embedding distillation (MSE to the teacher).
        logit: lambda_3, teacher-logit distillation on the boundary band.
        frequency: lambda_4, high-frequency spectrum matching of the prediction to the mask.
        intermediate: distillation of the encoder's intermediate outputs (TinyViT stages, ViT global blocks;
            :func:`medcore_monai.networks.taps.distillation_taps`), each MSE divided by the teacher output's
            variance so the taps weigh alike; 0 (MedCore) leaves the teacher's intermediate outputs unused.
        boundary_pixel_weight: band pixels weigh ``1 + boundary_pixel_weight`` in the boundary BCE (4 in the reference).
        normalise_logit_by_band: average the logit term over band pixels (default) instead of over all pixels,
            so its weight does not shrink with object size as in the reference.
        frequency_cutoff: radial frequency (cycles/pixel) above which spectra are compared.
    """

    boundary: float = 1.0
    feature: float = 0.5
    logit: float = 2.0
    frequency: float = 0.5
    intermediate: float = 0.0
    boundary_pixel_weight: float = 4.0
    normalise_logit_by_band: bool = True
    frequency_cutoff: float = 0.25

    def __post_init__(self) -> None:
        for name in ("boundary", "feature", "logit", "frequency", "intermediate", "boundary_pixel_weight"):
            value = getattr(self, name)
            if not (value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"recovery weight {name} must be finite and >= 0, got {value}")


def _plain_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    prob, target = prob.flatten(1), target.flatten(1)
    dice = (2.0 * (prob * target).sum(1)) / (prob.sum(1) + target.sum(1) + eps)
    return 1.0 - dice.mean()


def _high_pass(height: int, width: int, cutoff: float, device: torch.device) -> torch.Tensor:
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    return (torch.sqrt(fy.square() + fx.square()) > cutoff).float()


def intermediate_gap(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over taps of the MSE between student and teacher outputs, each relative to the teacher's variance."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"intermediate distillation needs matching taps, got {len(student)} and {len(teacher)}")
    gaps = []
    for s, t in zip(student, teacher):
        t = t.to(s.dtype)
        if s.shape != t.shape:
            raise ValueError(f"student tap of shape {tuple(s.shape)} does not match the teacher's {tuple(t.shape)}")
        gaps.append(F.mse_loss(s, t) / t.detach().var().clamp_min(1e-12))
    return torch.stack(gaps).mean()


def recovery_loss(
    logits: torch.Tensor,
    target_full: torch.Tensor,
    target_lowres: torch.Tensor,
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: RecoveryLossWeights = RecoveryLossWeights(),
    student_taps: Sequence[torch.Tensor] = (),
    teacher_taps: Sequence[torch.Tensor] = (),
) -> dict[str, torch.Tensor]:
    """All recovery terms and their weighted total (key ``loss``).

    Args:
        logits: student low-resolution logits ``[B, 1, s, s]``.
        target_full: binary mask at model resolution ``[B, 1, S, S]``.
        target_lowres: binary mask at logit resolution ``[B, 1, s, s]``.
        student_embedding: student image embedding.
        teacher_embedding: teacher image embedding (no grad).
        teacher_logits: teacher low-resolution logits (no grad).
        weights: term weights.
        student_taps: the student encoder's intermediate outputs (needed when ``weights.intermediate > 0``).
        teacher_taps: the teacher's outputs at the same taps (no grad).
    """
    target_full = target_full.to(logits.dtype)
    target_lowres = target_lowres.to(logits.dtype)
    up = F.interpolate(logits, size=target_full.shape[-2:], mode="bilinear", align_corners=False)
    prob_up = torch.sigmoid(up)
    seg = 0.5 * F.binary_cross_entropy_with_logits(up, target_full) + 0.5 * _plain_dice_loss(prob_up, target_full)
    pixel_weight = 1.0 + weights.boundary_pixel_weight * boundary_band(target_full).to(logits.dtype)
    bd = F.binary_cross_entropy_with_logits(up, target_full, weight=pixel_weight)
    feat = F.mse_loss(student_embedding, teacher_embedding.to(student_embedding.dtype))
    band = boundary_band(target_lowres).to(logits.dtype)
    squared = band * (logits - teacher_logits.to(logits.dtype)).square()
    logit = squared.sum() / band.sum().clamp_min(1.0) if weights.normalise_logit_by_band else squared.mean()
    # orthonormal FFT keeps the term's scale independent of the logit resolution
    spectrum_gap = torch.fft.rfft2(torch.sigmoid(logits), norm="ortho") - torch.fft.rfft2(target_lowres, norm="ortho")
    high = _high_pass(logits.shape[-2], logits.shape[-1], weights.frequency_cutoff, logits.device)
    freq = (spectrum_gap.abs() * high).mean()
    total = seg + weights.boundary * bd + weights.feature * feat + weights.logit * logit + weights.frequency * freq
    terms = {"seg": seg, "boundary": bd, "feature": feat, "logit": logit, "frequency": freq}
    if weights.intermediate > 0:
        terms["intermediate"] = intermediate_gap(student_taps, teacher_taps)
        total = total + weights.intermediate * terms["intermediate"]
    return {"loss": total} | terms


def boundary_complexity(mask_lowres: torch.Tensor) -> float:
    """Sampling weight of a calibration image: boundary-band size over sqrt(area), floored at 1e-4."""
    mask = (torch.as_tensor(mask_lowres) > 0.5).float().reshape(1, 1, *mask_lowres.shape[-2:])
    perimeter = float(boundary_band(mask).sum())
    area = float(mask.sum())
    return max(perimeter / (area**0.5 + 1.0), 1e-4)
