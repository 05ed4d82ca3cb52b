"""Small training handlers MONAI lacks: gradient-norm clipping, and binding early stopping to its trainer."""

from __future__ import annotations

from collections.abc import Iterable

from ignite.engine import Engine
from monai.engines import IterationEvents
from monai.handlers import EarlyStopHandler

from ..engines.common import clip_gradients

__all__ = ["GradientClipping", "bind_early_stopping"]


class GradientClipping:
    """Clip the gradient norm of the trained parameters after every backward pass (unscaled first under AMP).

    Args:
        max_norm: largest allowed total norm; ``None`` or ``0`` disables clipping.
    """

    def __init__(self, max_norm: float | None = 1.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        """Clip on MONAI's ``BACKWARD_COMPLETED``, i.e. before the optimizer step."""
        if self.max_norm:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Clip the gradients of the engine's optimizer's parameters."""
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip_gradients(engine, params, self.max_norm)


def bind_early_stopping(handlers: Iterable[object] | None, trainer: Engine) -> int:
    """Give every ``EarlyStopHandler`` among an evaluator's handlers the trainer it stops.

    The trainer refers to the evaluator (through ``ValidationHandler``), so the evaluator's handlers cannot refer
    back to the trainer in config; the bundle's ``run`` section binds them instead. Returns how many were bound.
    """
    bound = 0
    for handler in handlers or ():
        if isinstance(handler, EarlyStopHandler):
            handler.set_trainer(trainer)
            bound += 1
    return bound
