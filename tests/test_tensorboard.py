"""Optional TensorBoard logging: scalars land under the expected tags, from the main process only."""

from __future__ import annotations

import pytest
from ignite.engine import Engine, Events

from medcore_monai.handlers import attach_tensorboard

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_dict_outputs_are_logged_per_iteration_under_the_tag(tmp_path):
    engine = Engine(lambda e, batch: {"loss": float(batch), "seg": 2.0 * batch})
    assert attach_tensorboard(engine, tmp_path, "recovery_heads", lambda out: out)
    engine.run([1, 2, 3], max_epochs=1)
    scalars = {}
    for folder in {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}:
        scalars |= _scalars(folder)
    assert scalars["recovery_heads/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [v for _, v in scalars["recovery_heads/seg"]] == [2.0, 4.0, 6.0]


def test_epoch_metrics_use_the_given_epoch(tmp_path):
    engine = Engine(lambda e, batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def metric(e):
        e.state.metrics["val_loss"] = 0.5 / e.state.epoch

    attach_tensorboard(engine, tmp_path, "validation", epoch_log=True, epoch_of=lambda epoch: 10 * epoch)
    engine.run([0], max_epochs=2)
    scalars = _scalars(tmp_path)
    assert scalars["val_loss"] == [(10, 0.5), (20, 0.25)]
