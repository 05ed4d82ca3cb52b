"""Console logs say "resuming" only when a run resumes something."""

from __future__ import annotations

import logging

from medcore_monai.logs import FreshRunFilter


def _record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)


def test_only_resumes_from_iteration_0_are_dropped():
    keep = FreshRunFilter().filter
    assert not keep(
        _record("ignite.engine.engine.RecoveryTrainer", "Engine run resuming from iteration 0, epoch 0 until 2")
    )
    assert keep(
        _record("ignite.engine.engine.RecoveryTrainer", "Engine run resuming from iteration 150, epoch 1 until 2")
    )
    assert keep(_record("medcore_monai.handlers.checkpointing", "Engine run resuming from iteration 0, said someone"))
