"""MedCore pruning: boundary-aware Fisher, dual-intervention scores, budgets."""

from .budget import (
    BudgetReport,
    BudgetShortfallWarning,
    allocate_quota,
    block_sensitivity,
    min_keep_per_block,
    plan_family,
    plan_masks,
    select_removals,
)
from .cascade import CascadeConfig, CascadeResult, CascadeState, RecoveryConfig, score_model, score_model_methods
from .fisher import (
    FisherAccumulator,
    FisherCalibration,
    FisherResult,
    compute_fisher,
    create_fisher_engine,
    cross_fisher,
)
from .scores import (
    SCORE_METHODS,
    GroupScores,
    aggregate_datasets,
    alpha_per_block,
    magnitude_scores,
    mix_scores,
    random_scores,
    reset_scores,
    zero_scores,
)

__all__ = [
    "CascadeConfig",
    "CascadeResult",
    "CascadeState",
    "RecoveryConfig",
    "score_model",
    "score_model_methods",
    "SCORE_METHODS",
    "BudgetReport",
    "BudgetShortfallWarning",
    "FisherAccumulator",
    "FisherCalibration",
    "FisherResult",
    "GroupScores",
    "aggregate_datasets",
    "allocate_quota",
    "alpha_per_block",
    "block_sensitivity",
    "compute_fisher",
    "create_fisher_engine",
    "cross_fisher",
    "magnitude_scores",
    "min_keep_per_block",
    "mix_scores",
    "plan_family",
    "plan_masks",
    "random_scores",
    "reset_scores",
    "select_removals",
    "zero_scores",
]
