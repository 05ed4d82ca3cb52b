"""Ignite handlers of medcore_monai (usable as ``_target_`` in MONAI bundle configs)."""

from medcore_monai.engines.tensorboard import attach_tensorboard  # re-exported: a handler helper
from medcore_monai.handlers.boundary import HD95, BoundaryF1
from medcore_monai.handlers.checkpointing import TrainingCheckpoint
from medcore_monai.handlers.evaluation import DatasetMetrics, EvaluationReport
from medcore_monai.handlers.leverage import LeverageAnalysis, leverage_report
from medcore_monai.handlers.predictions import PredictionWriter
from medcore_monai.handlers.prune_report import PruneReport
from medcore_monai.handlers.pruning import PruningHandler, StageRecorder
from medcore_monai.handlers.robustness import corruption_grid, corruption_sweep
from medcore_monai.handlers.training import GradientClipping, StageLrSchedule, bind_early_stopping

__all__ = [
    "HD95",
    "BoundaryF1",
    "DatasetMetrics",
    "EvaluationReport",
    "GradientClipping",
    "LeverageAnalysis",
    "PredictionWriter",
    "PruneReport",
    "PruningHandler",
    "StageLrSchedule",
    "StageRecorder",
    "TrainingCheckpoint",
    "attach_tensorboard",
    "bind_early_stopping",
    "corruption_grid",
    "corruption_sweep",
    "leverage_report",
]
