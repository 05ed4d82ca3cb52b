"""transforms of medcore_monai."""

from medcore_monai.transforms.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    Corrupt,
    Corruptd,
    corrupt,
    corruption_seed,
    severity_parameters,
)
from medcore_monai.transforms.medsam import (
    EMPTY_MASK_POLICIES,
    BinarizeMaskd,
    BoxFromMaskd,
    EnsureThreeChanneld,
    LoadImage2Dd,
    MinMaxScaled,
    RandBoxFromMaskd,
    ResizeForSAMd,
    binarize_mask,
    box_from_mask,
    jitter_seed,
    medsam_preprocess,
    min_max_scale,
)

__all__ = [
    "CORRUPTIONS",
    "EMPTY_MASK_POLICIES",
    "SEVERITIES",
    "BinarizeMaskd",
    "BoxFromMaskd",
    "Corrupt",
    "Corruptd",
    "EnsureThreeChanneld",
    "LoadImage2Dd",
    "MinMaxScaled",
    "RandBoxFromMaskd",
    "ResizeForSAMd",
    "binarize_mask",
    "box_from_mask",
    "corrupt",
    "corruption_seed",
    "jitter_seed",
    "medsam_preprocess",
    "min_max_scale",
    "severity_parameters",
]
