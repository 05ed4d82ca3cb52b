"""Attributions of a scalar target ``f`` (a batch ``[N, C, S, S]`` to ``[N]``) to the pixels of one image.

:func:`path_attribution` is the Aumann-Shapley line integral of ``grad f`` along a polyline path: on every
segment the integral of ``grad f(a + s (b - a)) * (b - a)`` over ``s`` in [0, 1] is taken with Gauss-Legendre
quadrature, so the attributions of the whole path sum to ``f(image) - f(baseline)`` up to the quadrature error
(exact for targets that are polynomials of degree below ``2 * points`` along each segment). Integrated
gradients is the one-segment straight path. The other baselines of the comparison are GradientSHAP (expected
gradients over random baselines and interpolation points) and MONAI's occlusion sensitivity.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .path import TransportPath, straight_path

__all__ = [
    "Target",
    "Attribution",
    "gauss_legendre",
    "path_attribution",
    "integrated_gradients",
    "gradient_shap",
    "occlusion",
]

Target = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Attribution:
    """A map ``[C, S, S]`` with the target at the image and at the baseline it was explained against.

    ``baseline_value`` is ``None`` for methods without a single baseline (occlusion, GradientSHAP's average).
    """

    values: torch.Tensor
    target_value: float
    baseline_value: float | None

    @property
    def completeness_gap(self) -> float | None:
        """``sum(values) - (f(image) - f(baseline))``."""
        if self.baseline_value is None:
            return None
        return float(self.values.sum()) - (self.target_value - self.baseline_value)

    @property
    def relative_completeness_gap(self) -> float | None:
        """The gap over ``|f(image) - f(baseline)|``."""
        gap = self.completeness_gap
        if gap is None:
            return None
        return abs(gap) / max(abs(self.target_value - self.baseline_value), 1e-12)

    def spatial(self) -> torch.Tensor:
        """``[S, S]``: the channels summed (one value per pixel, as deletion and the heat maps use it)."""
        return self.values.sum(0)


def gauss_legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``points``-point Gauss-Legendre quadrature on [0, 1]."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    nodes, weights = np.polynomial.legendre.leggauss(points)
    return (nodes + 1.0) / 2.0, weights / 2.0


def _gradients(target: Target, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    grads = []
    for chunk in inputs.split(batch_size):
        chunk = chunk.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(target(chunk).sum(), chunk)
        grads.append(grad.detach())
    return torch.cat(grads)


@torch.no_grad()
def _value(target: Target, image: torch.Tensor) -> float:
    return float(target(image[None])[0])


def path_attribution(target: Target, path: TransportPath, points: int = 4, batch_size: int = 8) -> Attribution:
    """Line integral of ``grad target`` along ``path``, ``points`` Gauss-Legendre nodes per segment."""
    fractions, weights = gauss_legendre(points)
    starts, ends = path.nodes[:-1], path.nodes[1:]
    shape = (1, -1) + (1,) * (path.nodes.ndim - 1)
    s = torch.as_tensor(fractions, dtype=starts.dtype, device=starts.device).view(shape)
    w = torch.as_tensor(weights, dtype=starts.dtype, device=starts.device).view(shape)
    deltas = ends - starts
    inputs = (starts[:, None] + s * deltas[:, None]).flatten(0, 1)
    grads = _gradients(target, inputs, batch_size).view(len(starts), points, *starts.shape[1:])
    values = ((grads * w).sum(1) * deltas).sum(0)
    return Attribution(values, _value(target, path.image), _value(target, path.baseline))


def integrated_gradients(
    target: Target, image: torch.Tensor, baseline: torch.Tensor, points: int = 16, batch_size: int = 8
) -> Attribution:
    """Integrated gradients on the straight line from ``baseline``, with ``points`` Gauss-Legendre nodes."""
    return path_attribution(target, straight_path(image, baseline), points, batch_size)


def gradient_shap(
    target: Target,
    image: torch.Tensor,
    baselines: torch.Tensor,
    samples: int = 32,
    noise: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
) -> Attribution:
    """GradientSHAP (expected gradients) against random baselines.

    The mean of ``grad f(b + a (x' - b)) * (x' - b)`` over baselines ``b`` drawn from ``baselines``
    ``[M, C, S, S]``, ``a`` uniform in [0, 1] and ``x' = x + N(0, noise^2)``; completeness holds in expectation
    against the mean baseline value.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pick = torch.randint(baselines.shape[0], (samples,), generator=generator)
    alphas = torch.rand(samples, generator=generator).to(image).view(-1, *([1] * image.ndim))
    jitter = torch.randn((samples, *image.shape), generator=generator).to(image) * noise
    chosen = baselines[pick.to(baselines.device)].to(image)
    deltas = image[None] + jitter - chosen
    grads = _gradients(target, chosen + alphas * deltas, batch_size)
    values = (grads * deltas).mean(0)
    with torch.no_grad():
        baseline_value = float(target(baselines.to(image)).mean())
    return Attribution(values, _value(target, image), baseline_value)


class _AsClassifier(torch.nn.Module):
    """A target as a one-class classifier ``[B, C, S, S] -> [B, 1]``, the interface MONAI's occlusion expects."""

    def __init__(self, target: Target) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(x).reshape(-1, 1)


@torch.no_grad()
def occlusion(target: Target, image: torch.Tensor, mask_size: int = 8, n_batch: int = 16) -> Attribution:
    """MONAI's ``OcclusionSensitivity`` as an attribution.

    Each pixel gets ``f(x) - f(x occluded around it)`` (MONAI's Gaussian-weighted patch), divided evenly over
    the channels.
    """
    from monai.visualize import OcclusionSensitivity

    occluder = OcclusionSensitivity(
        _AsClassifier(target), mask_size=mask_size, n_batch=n_batch, verbose=False, activate=False
    )
    with warnings.catch_warnings():  # MONAI 1.6 indexes with lists, which torch deprecates
        warnings.simplefilter("ignore", UserWarning)
        occluded, _ = occluder(image[None])
    value = _value(target, image)
    drop = value - occluded.as_tensor().reshape(-1, *image.shape[-2:]).mean(0)  # one class: the target
    return Attribution(drop.expand_as(image) / image.shape[0], value, None)
