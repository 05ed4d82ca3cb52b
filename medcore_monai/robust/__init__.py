"""Robustness (RobustMedSAM): SVD encoder adaptation; the decoder and fusion live in ``networks``."""

from medcore_monai.robust.svd import (
    apply_svd_adaptation,
    is_svd_adapted,
    merge_svd_adaptation,
    svd_parameter_count,
    svd_parameters,
    svd_regulariser,
)

__all__ = [
    "apply_svd_adaptation",
    "is_svd_adapted",
    "merge_svd_adaptation",
    "svd_parameter_count",
    "svd_parameters",
    "svd_regulariser",
]
