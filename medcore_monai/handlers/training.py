"""Small training handlers MONAI lacks: gradient clipping, a per-stage learning-rate schedule, early-stop binding."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ignite.engine import Engine, Events
from monai.engines import IterationEvents
from monai.handlers import EarlyStopHandler

from ..engines.common import clip_gradients
from ..pruning.cascade import LR_SCHEDULES

__all__ = ["GradientClipping", "StageLrSchedule", "bind_early_stopping", "stage_lr_factor"]


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


def stage_lr_factor(schedule: str, step: int, length: int, warmup_fraction: float = 0.05) -> float:
    """The fraction of the peak learning rate at ``step`` (from 0) of an epoch of ``length`` steps.

    ``constant`` is always 1; ``cosine`` rises linearly over the first ``warmup_fraction`` of the epoch (at least
    one step) and then decays to zero along half a cosine.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return 1.0
    warmup = max(1, int(length * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, length - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class StageLrSchedule:
    """Restart a learning-rate schedule at every epoch of a recovery (each epoch is one cascade stage).

    Before each iteration the optimizer's learning rates become their peak (the rate the optimizer was built
    with) times :func:`stage_lr_factor` of the step within the epoch. Nothing is stored, so the schedule follows
    the fresh optimizer a pruning handler builds after slimming and continues exactly where a resumed run
    stopped. Torch's schedulers would hold on to the optimizer they were built with.

    Args:
        schedule: one of ``medcore_monai.pruning.LR_SCHEDULES`` (``constant``, ``cosine``).
        warmup_fraction: share of each epoch spent rising to the peak (``cosine`` only).
    """

    def __init__(self, schedule: str = "cosine", warmup_fraction: float = 0.05) -> None:
        stage_lr_factor(schedule, 0, 1, warmup_fraction)  # a bad name fails here, not at the first iteration
        self.schedule = schedule
        self.warmup_fraction = warmup_fraction

    def attach(self, engine: Engine) -> None:
        """Set the learning rate at every ``ITERATION_STARTED``."""
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Scale each parameter group's peak rate by the schedule's factor for this step of the epoch."""
        length = engine.state.epoch_length or 1
        factor = stage_lr_factor(self.schedule, (engine.state.iteration - 1) % length, length, self.warmup_fraction)
        for group in engine.optimizer.param_groups:
            group["lr"] = group.setdefault("peak_lr", group["lr"]) * factor


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
