"""transforms of medcore_monai."""

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
    "EMPTY_MASK_POLICIES",
    "BinarizeMaskd",
    "BoxFromMaskd",
    "EnsureThreeChanneld",
    "LoadImage2Dd",
    "MinMaxScaled",
    "RandBoxFromMaskd",
    "ResizeForSAMd",
    "binarize_mask",
    "box_from_mask",
    "jitter_seed",
    "medsam_preprocess",
    "min_max_scale",
]
