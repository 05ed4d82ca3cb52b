"""data of medcore_monai: sources, splits and caching datasets for MedSAM pruning and evaluation."""

from medcore_monai.data.cache import CACHE_MODES, build_dataset, transform_fingerprint
from medcore_monai.data.datalists import (
    SplitDatalists,
    all_items,
    calibration_groups,
    dataset_name,
    foreground_slices,
    pooled,
    split_groups,
)
from medcore_monai.data.errors import DataError
from medcore_monai.data.io import IMAGE_SUFFIXES_2D, TIFF_SUFFIXES, read_image_2d
from medcore_monai.data.readers import Image2DReader
from medcore_monai.data.sample_dataset import SampleCacheDataset
from medcore_monai.data.sources import (
    NIFTI_SUFFIXES,
    datalist_items,
    drop_empty_masks,
    folder_pairs,
    has_foreground,
    nifti_slices,
    normalise_intensity,
    sample_stem,
)
from medcore_monai.data.splits import SPLIT_NAMES, SplitManifest, apply_split, make_splits

__all__ = [
    "CACHE_MODES",
    "IMAGE_SUFFIXES_2D",
    "NIFTI_SUFFIXES",
    "SPLIT_NAMES",
    "TIFF_SUFFIXES",
    "DataError",
    "Image2DReader",
    "SampleCacheDataset",
    "SplitDatalists",
    "SplitManifest",
    "apply_split",
    "all_items",
    "build_dataset",
    "calibration_groups",
    "datalist_items",
    "dataset_name",
    "drop_empty_masks",
    "folder_pairs",
    "foreground_slices",
    "has_foreground",
    "make_splits",
    "nifti_slices",
    "pooled",
    "normalise_intensity",
    "read_image_2d",
    "sample_stem",
    "split_groups",
    "transform_fingerprint",
]
