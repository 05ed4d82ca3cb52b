"""The recovery learning-rate schedule: its shape, and the handler that applies it to whichever optimizer is current."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from medcore_monai.handlers import StageLrSchedule
from medcore_monai.handlers.training import stage_lr_factor
from medcore_monai.pruning import RecoveryConfig


def test_cosine_factor_warms_up_then_decays_to_zero():
    factors = [stage_lr_factor("cosine", step, 40) for step in range(40)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # 5 % of 40 steps: two warm-up steps, then the decay from the peak
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))  # strictly falling
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 38))) and factors[-1] < 0.01
    assert [stage_lr_factor("constant", step, 40) for step in (0, 20, 39)] == [1.0, 1.0, 1.0]


def test_unknown_schedules_are_refused_where_they_are_named():
    with pytest.raises(ValueError, match="cosine"):
        RecoveryConfig(lr_schedule="cosin")
    with pytest.raises(ValueError, match="constant"):
        StageLrSchedule("linear")


def _engine_recording_lrs(rebuild: bool) -> tuple[Engine, list[float]]:
    def step(engine, _):
        engine.optimizer.step()

    engine = Engine(step)
    engine.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    if rebuild:  # what a pruning handler does at every stage start: a fresh optimizer at the peak rate
        engine.add_event_handler(
            Events.EPOCH_STARTED,
            lambda e: setattr(e, "optimizer", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)),
        )
    StageLrSchedule("cosine").attach(engine)
    lrs: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(e.optimizer.param_groups[0]["lr"]))
    return engine, lrs


@pytest.mark.parametrize("rebuild", [False, True])
def test_every_stage_restarts_the_schedule_on_the_current_optimizer(rebuild):
    engine, lrs = _engine_recording_lrs(rebuild)
    engine.run(range(20), max_epochs=2)
    expected = [0.2 * stage_lr_factor("cosine", step, 20) for step in range(20)]
    assert lrs == pytest.approx(expected + expected)


def test_a_resumed_run_continues_the_schedule_where_it_stopped():
    engine, lrs = _engine_recording_lrs(rebuild=False)
    engine.run(range(20), max_epochs=2)
    resumed, resumed_lrs = _engine_recording_lrs(rebuild=False)
    # what a checkpoint restores: the iteration count and the optimizer's state with the peak rate kept
    resumed.optimizer.load_state_dict(engine.optimizer.state_dict())
    resumed.load_state_dict({"iteration": 27, "epoch_length": 20, "max_epochs": 2})
    resumed.run(range(20))
    assert resumed_lrs == pytest.approx(lrs[27:])
