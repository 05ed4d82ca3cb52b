"""Ignite/MONAI engines of medcore_monai and the batch conventions they share."""

from medcore_monai.engines import distributed
from medcore_monai.engines.common import plain_tensor, prepare_medsam_batch
from medcore_monai.engines.measure import measure_latency, model_cost
from medcore_monai.engines.parameters import prepared_for_training, trainable_parameters
from medcore_monai.engines.recovery import (
    RecoverySampler,
    RecoveryTrainer,
    TeacherOutputs,
    recovery_loader,
    recovery_taps,
)

__all__ = [
    "distributed",
    "RecoverySampler",
    "RecoveryTrainer",
    "TeacherOutputs",
    "measure_latency",
    "model_cost",
    "plain_tensor",
    "prepare_medsam_batch",
    "prepared_for_training",
    "recovery_loader",
    "recovery_taps",
    "trainable_parameters",
]
