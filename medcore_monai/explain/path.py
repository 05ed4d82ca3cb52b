"""Explanation paths: an image's own transport path back to noise along the flow, and the straight line of IG.

A path is a polyline of nodes ``[K + 1, C, S, S]`` ordered from the baseline (``t = 0``) to the image
(``t = 1``). Inverting an image integrates the flow's ODE backwards with a fixed number of steps; the node
it ends at is the image's own baseline, so no baseline is chosen by hand. Nothing here claims the intermediate
nodes lie on the data manifold; the two diagnostics say how far the discrete path is from the flow it follows.
"""

from __future__ import annotations

import dataclasses

import torch

from .flow import VelocityField, generate

__all__ = ["TransportPath", "invert", "integrate", "straight_path", "round_trip_error", "field_mismatch"]


@dataclasses.dataclass
class TransportPath:
    """Nodes of a path from its baseline to the image, with the times they were visited.

    Attributes:
        nodes: ``[K + 1, C, S, S]``; ``nodes[0]`` is the baseline, ``nodes[-1]`` the image.
        times: ``[K + 1]`` increasing times in [0, 1].
    """

    nodes: torch.Tensor
    times: torch.Tensor

    @property
    def baseline(self) -> torch.Tensor:
        """The first node (``t = 0``)."""
        return self.nodes[0]

    @property
    def image(self) -> torch.Tensor:
        """The last node, the image (``t = 1``)."""
        return self.nodes[-1]

    def refined(self, factor: int) -> TransportPath:
        """The same polyline with ``factor`` equal sub-segments per segment (a re-parameterisation)."""
        fractions = torch.arange(factor, dtype=self.nodes.dtype, device=self.nodes.device) / factor
        starts, ends = self.nodes[:-1], self.nodes[1:]
        inner = starts[:, None] + fractions.view(1, -1, *([1] * (self.nodes.ndim - 1))) * (ends - starts)[:, None]
        nodes = torch.cat([inner.flatten(0, 1), self.nodes[-1:]])
        t0, t1 = self.times[:-1], self.times[1:]
        times = torch.cat([(t0[:, None] + fractions.to(self.times) * (t1 - t0)[:, None]).flatten(), self.times[-1:]])
        return TransportPath(nodes, times)


@torch.no_grad()
def invert(flow: VelocityField, image: torch.Tensor, steps: int = 16, iterations: int = 4) -> TransportPath:
    """Integrate ``dx/dt = v(x, t)`` from the image ``[C, S, S]`` at ``t = 1`` back to ``t = 0`` in ``steps`` steps.

    Each step solves for the node that one forward Euler step carries to the node after it, by ``iterations``
    fixed-point iterations started from a backward Euler step (``iterations=0``: plain backward Euler). When
    the iterations converge the nodes are exactly the forward Euler trajectory from the baseline to the image,
    so :func:`round_trip_error` is small; it measures how well they converged.
    """
    if steps < 1 or iterations < 0:
        raise ValueError(f"steps must be >= 1 and iterations >= 0, got {steps} and {iterations}")
    flow.check_images(image[None], "the image to explain")
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=image.dtype, device=image.device)
    nodes = [image]
    x = image[None]
    for k in range(steps, 0, -1):
        dt = times[k] - times[k - 1]
        previous = x - dt * flow(x, times[k])
        for _ in range(iterations):
            previous = x - dt * flow(previous, times[k - 1])
        x = previous
        nodes.append(x[0])
    return TransportPath(torch.stack(nodes[::-1]), times)


def integrate(flow: VelocityField, start: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The image the flow carries ``start`` ``[C, S, S]`` to, Euler forward on ``times`` (increasing)."""
    return generate(flow, start[None], times)[0]


def straight_path(image: torch.Tensor, baseline: torch.Tensor, segments: int = 1) -> TransportPath:
    """The straight line from ``baseline`` to ``image`` (integrated gradients' path), split into ``segments``."""
    times = torch.linspace(0.0, 1.0, segments + 1, dtype=image.dtype, device=image.device)
    nodes = baseline[None] + times.view(-1, *([1] * image.ndim)) * (image - baseline)[None]
    return TransportPath(nodes, times)


def _relative_norm(difference: torch.Tensor, reference: torch.Tensor) -> float:
    return float(difference.norm() / reference.norm().clamp_min(1e-12))


def round_trip_error(flow: VelocityField, path: TransportPath) -> float:
    """``||integrate(baseline) - image|| / ||image||``: invert, then carry the baseline forward again."""
    return _relative_norm(integrate(flow, path.baseline, path.times) - path.image, path.image)


@torch.no_grad()
def field_mismatch(flow: VelocityField, path: TransportPath) -> float:
    """Mean over segments of ``||step / dt - v(node, t)|| / ||v(node, t)||``, the path's steps against the field.

    Near zero for a path that follows the flow; large for a straight line through a curved field.
    """
    steps = (path.nodes[1:] - path.nodes[:-1]) / (path.times[1:] - path.times[:-1]).view(-1, 1, 1, 1)
    errors = []
    for k, step in enumerate(steps):
        velocity = flow(path.nodes[k : k + 1], path.times[k])[0]
        errors.append(_relative_norm(step - velocity, velocity))
    return float(sum(errors) / len(errors))
